//! Turning token pieces into the text a client sees. A piece can end in the
//! middle of a UTF-8 character, and the text so far can end in the first
//! half of a stop string; neither may reach the client, so both are held
//! back until the next piece settles them.

/// What one more piece of output did.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Text that is safe to send now (possibly empty).
    Emit(String),
    /// A stop string appeared: send this text, then finish. The second
    /// field is the stop string that matched.
    Stop(String, String),
}

#[derive(Debug, Default)]
pub struct TextOut {
    stops: Vec<String>,
    /// Bytes that do not yet form a whole character.
    raw: Vec<u8>,
    /// Decoded text held back because it may begin a stop string.
    held: String,
}

impl TextOut {
    pub fn new(stops: Vec<String>) -> Self {
        TextOut {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            ..TextOut::default()
        }
    }

    pub fn push(&mut self, piece: &[u8]) -> Step {
        self.raw.extend_from_slice(piece);
        let decoded = take_utf8(&mut self.raw);
        self.held.push_str(&decoded);
        if let Some((at, word)) = self.earliest_stop() {
            let text = self.held[..at].to_string();
            self.held.clear();
            return Step::Stop(text, word);
        }
        let keep = self.partial_stop_len();
        let cut = self.held.len() - keep;
        let out = self.held[..cut].to_string();
        self.held.drain(..cut);
        Step::Emit(out)
    }

    /// Whatever is still held back, at the end of generation.
    pub fn finish(&mut self) -> String {
        let mut out = std::mem::take(&mut self.held);
        out.push_str(&String::from_utf8_lossy(&std::mem::take(&mut self.raw)));
        out
    }

    fn earliest_stop(&self) -> Option<(usize, String)> {
        self.stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()).map(|at| (at, s.clone())))
            .min()
    }

    /// The length of the longest tail of `held` that is a proper prefix of
    /// some stop string.
    fn partial_stop_len(&self) -> usize {
        let mut best = 0;
        for (start, _) in self.held.char_indices() {
            let tail = &self.held[start..];
            if self
                .stops
                .iter()
                .any(|s| s.len() > tail.len() && s.starts_with(tail))
            {
                best = tail.len();
                break;
            }
        }
        best
    }
}

/// Split off the longest prefix of `raw` that is whole UTF-8; bytes that can
/// never become valid are replaced rather than held forever.
fn take_utf8(raw: &mut Vec<u8>) -> String {
    let mut out = String::new();
    loop {
        match std::str::from_utf8(raw) {
            Ok(s) => {
                out.push_str(s);
                raw.clear();
                return out;
            }
            Err(e) => {
                let valid = e.valid_up_to();
                out.push_str(&String::from_utf8_lossy(&raw[..valid]));
                match e.error_len() {
                    // An incomplete character at the end: wait for more.
                    None => {
                        raw.drain(..valid);
                        return out;
                    }
                    Some(bad) => {
                        out.push(char::REPLACEMENT_CHARACTER);
                        raw.drain(..valid + bad);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_characters_wait_for_their_other_half() {
        let mut t = TextOut::new(vec![]);
        let snow = "☃".as_bytes();
        assert_eq!(t.push(&snow[..1]), Step::Emit(String::new()));
        assert_eq!(t.push(&snow[1..]), Step::Emit("☃".into()));
        assert_eq!(t.push(&[0xff, b'a']), Step::Emit("\u{fffd}a".into()));
    }

    #[test]
    fn a_stop_string_split_across_pieces_is_never_sent() {
        let mut t = TextOut::new(vec!["<end>".into()]);
        assert_eq!(t.push(b"hello <e"), Step::Emit("hello ".into()));
        assert_eq!(t.push(b"n"), Step::Emit(String::new()));
        assert_eq!(t.push(b"d> more"), Step::Stop("".into(), "<end>".into()));
    }

    #[test]
    fn held_text_that_is_not_a_stop_is_released() {
        let mut t = TextOut::new(vec!["<end>".into()]);
        assert_eq!(t.push(b"a <"), Step::Emit("a ".into()));
        assert_eq!(t.push(b"b"), Step::Emit("<b".into()));
        assert_eq!(t.push(b"<en"), Step::Emit(String::new()));
        assert_eq!(t.finish(), "<en");
    }

    #[test]
    fn the_earliest_of_several_stops_wins() {
        let mut t = TextOut::new(vec!["END".into(), "\n\n".into()]);
        assert_eq!(t.push(b"x\n\ny END"), Step::Stop("x".into(), "\n\n".into()));
    }
}
