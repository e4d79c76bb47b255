//! Tokenizing prompts in time linear in their length.
//!
//! llama.cpp first splits a prompt at its special tokens (`<|im_start|>`,
//! `<|im_end|>`, …) and then tokenizes the text between them; that split
//! walks its list of pieces from the start at every match, so it costs the
//! square of the number of special tokens. A chat of 30,000 one-word
//! messages (1 MB) took 7.9 s in the worker, 60,000 took 28 s, and every
//! other request on the model waited behind it.
//!
//! So a prompt with many special tokens is cut, just before some of them,
//! into chunks of a few dozen that llama.cpp tokenizes one by one. The
//! tokens are the same as in one call: llama.cpp's split keeps the text on
//! either side of a special token apart anyway, and tokenizes each piece on
//! its own. A cut is made only where that is certain: before a special
//! token that no other special token's text overlaps and that does not
//! strip the whitespace on its left (`lstrip`); the tokens llama.cpp adds
//! around a whole prompt (BOS, EOS) are added once, around all the chunks.

use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::token::LlamaToken;
use llama_cpp_2::token_type::LlamaTokenAttr;

/// Special tokens per chunk: the quadratic part costs at most this squared
/// per chunk, and fewer than this in a whole prompt is one call as before.
const CHUNK: usize = 64;

/// What the worker needs to tokenize prompts of one model.
pub struct Tokenizer<'m> {
    model: &'m LlamaModel,
    /// The special tokens llama.cpp splits at when it parses them
    /// (control, user-defined and unknown tokens), and when it does not
    /// (only user-defined ones).
    parsed: Specials,
    unparsed: Specials,
    /// What llama.cpp adds around a prompt when asked to add special
    /// tokens (BOS before; EOS or SEP after, for some models); `None` when
    /// probing could not tell, and then every prompt is one call.
    affixes: Option<(Vec<LlamaToken>, Vec<LlamaToken>)>,
    /// The longest text of any token, in bytes.
    longest_token: usize,
}

impl<'m> Tokenizer<'m> {
    pub fn new(model: &'m LlamaModel) -> Tokenizer<'m> {
        let vocab = model.vocab();
        let mut parsed = Vec::new();
        let mut unparsed = Vec::new();
        let mut longest_token = 1;
        for token in vocab.tokens() {
            let Some(text) = vocab.text(token).map(|t| t.to_bytes().to_vec()) else {
                continue;
            };
            longest_token = longest_token.max(text.len());
            let attr = vocab.attr(token);
            let user = attr.contains(LlamaTokenAttr::UserDefined);
            let control = attr.intersects(LlamaTokenAttr::Control | LlamaTokenAttr::Unknown);
            if text.is_empty() || !(user || control) {
                continue;
            }
            let special = Special {
                text,
                cut_before: !attr.contains(LlamaTokenAttr::LStrip),
            };
            if user {
                unparsed.push(special.clone());
            }
            parsed.push(special);
        }
        let affixes = {
            let with = vocab.tokenize(b"a", true, true);
            let bare = vocab.tokenize(b"a", false, true);
            (0..=with.len().saturating_sub(bare.len()))
                .find(|&i| with[i..].starts_with(&bare))
                .map(|i| (with[..i].to_vec(), with[i + bare.len()..].to_vec()))
        };
        Tokenizer {
            model,
            parsed: Specials::new(&parsed),
            unparsed: Specials::new(&unparsed),
            affixes,
            longest_token,
        }
    }

    pub fn bos(&self) -> LlamaToken {
        self.model.vocab().bos()
    }

    /// The longest text of any token, in bytes: a prompt of `n` tokens is
    /// at most `n` times this long.
    pub fn longest_token(&self) -> usize {
        self.longest_token
    }

    /// Tokens of `text` exactly as llama.cpp's tokenizer gives them
    /// (`add_special`: BOS/EOS as the model wants; `parse_special`: special
    /// tokens' texts become those tokens).
    pub fn tokenize(&self, text: &str, add_special: bool, parse_special: bool) -> Vec<LlamaToken> {
        let vocab = self.model.vocab();
        let specials = if parse_special {
            &self.parsed
        } else {
            &self.unparsed
        };
        let cuts = specials.cuts(text.as_bytes(), CHUNK);
        let affixes = match (&self.affixes, add_special) {
            (_, false) => Some((&[][..], &[][..])),
            (Some((before, after)), true) => Some((&before[..], &after[..])),
            (None, true) => None,
        };
        let Some((before, after)) = affixes.filter(|_| !cuts.is_empty()) else {
            return vocab.tokenize(text.as_bytes(), add_special, parse_special);
        };
        let mut tokens = before.to_vec();
        let mut start = 0;
        for end in cuts.into_iter().chain([text.len()]) {
            tokens.extend(vocab.tokenize(&text.as_bytes()[start..end], false, parse_special));
            start = end;
        }
        tokens.extend_from_slice(after);
        tokens
    }
}

#[derive(Debug, Clone)]
struct Special {
    text: Vec<u8>,
    /// A chunk may begin with this token (it does not strip whitespace on
    /// its left, which belongs to the chunk before).
    cut_before: bool,
}

/// The special tokens' texts as a byte trie, for finding them in one pass.
#[derive(Debug, Default)]
struct Specials {
    nodes: Vec<Node>,
    /// Bytes a special token can begin with, to skip the rest fast.
    first: Vec<bool>,
    longest: usize,
}

#[derive(Debug, Default)]
struct Node {
    next: Vec<(u8, usize)>,
    /// A special token ends here; whether a chunk may begin with it.
    end: Option<bool>,
}

impl Specials {
    fn new(specials: &[Special]) -> Specials {
        let mut s = Specials {
            nodes: vec![Node::default()],
            first: vec![false; 256],
            longest: 0,
        };
        for special in specials {
            let mut at = 0;
            for &b in &special.text {
                at = match s.nodes[at].next.iter().find(|(c, _)| *c == b) {
                    Some(&(_, n)) => n,
                    None => {
                        s.nodes.push(Node::default());
                        let n = s.nodes.len() - 1;
                        s.nodes[at].next.push((b, n));
                        n
                    }
                };
            }
            // Two tokens with the same text: a cut needs both to allow it.
            let end = &mut s.nodes[at].end;
            *end = Some(end.unwrap_or(true) && special.cut_before);
            s.first[usize::from(special.text[0])] = true;
            s.longest = s.longest.max(special.text.len());
        }
        s
    }

    /// The ends of the special tokens' texts that start at `at`, shortest
    /// first, with whether a chunk may begin there.
    fn matches_at<'a>(
        &'a self,
        text: &'a [u8],
        at: usize,
    ) -> impl Iterator<Item = (usize, bool)> + 'a {
        let mut node = 0;
        let mut i = at;
        std::iter::from_fn(move || {
            while i < text.len() {
                let b = text[i];
                i += 1;
                node = self.nodes[node].next.iter().find(|(c, _)| *c == b)?.1;
                if let Some(cut) = self.nodes[node].end {
                    return Some((i, cut));
                }
            }
            None
        })
    }

    /// Where to cut `text` so that each chunk holds about `every` special
    /// tokens; none when it holds fewer than that in all.
    fn cuts(&self, text: &[u8], every: usize) -> Vec<usize> {
        let mut cuts = Vec::new();
        if self.longest == 0 {
            return cuts;
        }
        let (mut at, mut seen) = (0, 0);
        while at < text.len() {
            if !self.first[usize::from(text[at])] {
                at += 1;
                continue;
            }
            // The longest special token starting here, as llama.cpp, which
            // tries the longest tokens first, would take it.
            let Some((end, cut)) = self.matches_at(text, at).last() else {
                at += 1;
                continue;
            };
            seen += 1;
            if seen >= every && cut && at > 0 && self.alone(text, at, end) {
                cuts.push(at);
                seen = 0;
            }
            at = end;
        }
        cuts
    }

    /// No other special token's text overlaps `text[start..end]`: none
    /// begins before it and reaches into it, and none begins inside it and
    /// reaches past its end. (Ones wholly inside are shorter, and llama.cpp
    /// takes the longer first.) Then llama.cpp surely splits there.
    fn alone(&self, text: &[u8], start: usize, end: usize) -> bool {
        let from = start.saturating_sub(self.longest - 1);
        let reaches_in = (from..start).any(|q| self.matches_at(text, q).any(|(e, _)| e > start));
        let reaches_out = (start + 1..end).any(|q| self.matches_at(text, q).any(|(e, _)| e > end));
        !reaches_in && !reaches_out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn specials(texts: &[(&str, bool)]) -> Specials {
        let list: Vec<Special> = texts
            .iter()
            .map(|(t, cut)| Special {
                text: t.as_bytes().to_vec(),
                cut_before: *cut,
            })
            .collect();
        Specials::new(&list)
    }

    fn chat(n: usize) -> String {
        (0..n)
            .map(|i| format!("<|im_start|>user\nmessage {i}<|im_end|>\n"))
            .collect()
    }

    #[test]
    fn a_prompt_with_few_special_tokens_is_not_cut() {
        let s = specials(&[("<|im_start|>", true), ("<|im_end|>", true)]);
        assert!(s.cuts(chat(10).as_bytes(), 64).is_empty());
    }

    #[test]
    fn cuts_fall_just_before_special_tokens_every_so_many() {
        let s = specials(&[("<|im_start|>", true), ("<|im_end|>", true)]);
        let text = chat(100);
        let cuts = s.cuts(text.as_bytes(), 10);
        // 200 special tokens: a cut before the 10th, the 20th, … the 200th.
        assert_eq!(cuts.len(), 20, "{cuts:?}");
        for &c in &cuts {
            assert!(text[c..].starts_with("<|im_"), "{}", &text[c..c + 20]);
        }
    }

    #[test]
    fn no_cut_before_a_token_that_strips_the_left_or_is_overlapped() {
        let lstrip = specials(&[("<s>", false)]);
        assert!(lstrip.cuts("a <s>".repeat(100).as_bytes(), 4).is_empty());
        // "<ab>" inside "x<ab>y" where "x<a" is also a special token: the
        // two overlap, so llama.cpp might take either; no cut there.
        let overlapping = specials(&[("<ab>", true), ("x<a", true)]);
        let text = "x<ab>".repeat(100);
        for c in overlapping.cuts(text.as_bytes(), 1) {
            assert!(text[c..].starts_with("x<a"), "cut at {c}");
        }
    }

    #[test]
    fn finding_the_cuts_is_linear() {
        let s = specials(&[("<|im_start|>", true), ("<|im_end|>", true), ("<|", true)]);
        let small = chat(10_000);
        let big = chat(80_000);
        let time = |t: &str| {
            let start = std::time::Instant::now();
            let n = s.cuts(t.as_bytes(), 64).len();
            (start.elapsed(), n)
        };
        let (a, _) = time(&small);
        let (b, n) = time(&big);
        assert!(n > 0);
        // 8x the text; quadratic would be 64x. Allow noise.
        assert!(
            b < a * 24 + std::time::Duration::from_millis(50),
            "{a:?} then {b:?}"
        );
    }

    /// SmolLM2's own chat template's shape, `n` messages.
    fn smollm2_chat(n: usize) -> String {
        let mut text = String::from("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n");
        for i in 0..n {
            let role = if i % 2 == 0 { "user" } else { "assistant" };
            text.push_str(&format!("<|im_start|>{role}\nhi {i}  <|im_end|>\n"));
        }
        text + "<|im_start|>assistant\n"
    }

    #[test]
    fn chunks_give_llama_cpps_own_tokens_for_the_real_vocabulary() {
        let Some(path) = crate::chat::model_tests::model_path() else {
            return;
        };
        let model = crate::chat::model_tests::load(&path, true);
        let tokenizer = Tokenizer::new(&model);
        let vocab = model.vocab();
        let tricky = "<|im_start|>user\n <|im_end|><|im_end|>\n\n<|endoftext|>x<|im_start|> \u{e9}t\u{e9}<|im_end|>".repeat(200);
        for text in [smollm2_chat(3), smollm2_chat(500), tricky, String::new()] {
            for (add, parse) in [(true, true), (false, true), (true, false), (false, false)] {
                assert_eq!(
                    tokenizer.tokenize(&text, add, parse),
                    vocab.tokenize(text.as_bytes(), add, parse),
                    "{} bytes, add_special {add}, parse_special {parse}",
                    text.len()
                );
            }
        }
        assert!(tokenizer.longest_token() >= 4);
    }

    /// The measure of the fix: llama.cpp alone against the chunks, on a
    /// chat of 30,000 messages (`--nocapture` prints the times).
    #[test]
    fn a_chat_of_thirty_thousand_messages_tokenizes_in_linear_time() {
        let Some(path) = crate::chat::model_tests::model_path() else {
            return;
        };
        let model = crate::chat::model_tests::load(&path, true);
        let tokenizer = Tokenizer::new(&model);
        let time = |n: usize| {
            let text = smollm2_chat(n);
            let start = std::time::Instant::now();
            let tokens = tokenizer.tokenize(&text, true, true);
            (start.elapsed(), tokens.len(), text.len())
        };
        let (small, _, _) = time(3_000);
        let (big, tokens, bytes) = time(30_000);
        eprintln!("chunked: 3,000 messages {small:?}; 30,000 messages ({bytes} bytes, {tokens} tokens) {big:?}");
        // Ten times the messages: about ten times the time, not a hundred.
        assert!(
            big < small * 30 + std::time::Duration::from_millis(100),
            "{small:?} then {big:?}"
        );
        if std::env::var_os("MOAT_MEASURE_LLAMA_TOKENIZE").is_some() {
            let text = smollm2_chat(30_000);
            let start = std::time::Instant::now();
            let n = model.vocab().tokenize(text.as_bytes(), true, true).len();
            eprintln!(
                "llama.cpp in one call: 30,000 messages ({n} tokens) {:?}",
                start.elapsed()
            );
        }
    }
}
