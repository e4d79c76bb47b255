//! JSON written the way Python's `json.dumps` writes it, because that is what
//! the `tojson` filter of Hugging Face's `apply_chat_template` produces and
//! what models saw in training: `", "` and `": "` separators, floats as
//! Python's `repr`, non-ASCII left as is (`ensure_ascii=False`), and no HTML
//! escaping (minijinja's own `tojson` escapes `<`, `>`, `&` and `'`, which
//! would change `<tool_call>`-style text inside tool descriptions).

use minijinja::value::{Value, ValueKind};

/// `json.dumps` options that chat templates pass to `tojson`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DumpOptions {
    /// Indentation string for each level; `None` writes everything on one line.
    pub indent: Option<String>,
    /// Item and key separators; `None` uses Python's defaults for the indent.
    pub separators: Option<(String, String)>,
    pub sort_keys: bool,
    pub ensure_ascii: bool,
}

/// Writes `value` as `json.dumps(value, **options)` would. Maps keep their
/// order (minijinja keeps insertion order), so the output does not depend on
/// how serde_json was built. Undefined is `null`; anything that is not data
/// (a function, an opaque object) is written as its string.
pub fn dumps(value: &Value, options: &DumpOptions) -> String {
    let (item_sep, key_sep) = match &options.separators {
        Some((item, key)) => (item.clone(), key.clone()),
        None if options.indent.is_some() => (",".to_owned(), ": ".to_owned()),
        None => (", ".to_owned(), ": ".to_owned()),
    };
    let mut writer = Writer {
        out: String::new(),
        options,
        item_sep,
        key_sep,
    };
    writer.value(value, 0);
    writer.out
}

struct Writer<'a> {
    out: String,
    options: &'a DumpOptions,
    item_sep: String,
    key_sep: String,
}

impl Writer<'_> {
    fn value(&mut self, value: &Value, depth: usize) {
        match value.kind() {
            ValueKind::Undefined | ValueKind::None => self.out.push_str("null"),
            ValueKind::Bool => self
                .out
                .push_str(if value.is_true() { "true" } else { "false" }),
            ValueKind::Number => {
                if value.is_integer() {
                    self.out.push_str(&value.to_string());
                } else {
                    let f = f64::try_from(value.clone()).unwrap_or(f64::NAN);
                    self.out.push_str(&float_repr(f));
                }
            }
            ValueKind::String => self.string(value.as_str().unwrap_or_default()),
            ValueKind::Seq | ValueKind::Iterable => {
                let items: Vec<Value> = value.try_iter().map(Iterator::collect).unwrap_or_default();
                self.sequence(&items, depth);
            }
            ValueKind::Map => {
                let mut entries: Vec<(String, Value)> = value
                    .try_iter()
                    .map(|keys| {
                        keys.map(|k| {
                            let item = value.get_item(&k).unwrap_or_default();
                            (
                                k.as_str().map_or_else(|| k.to_string(), str::to_owned),
                                item,
                            )
                        })
                        .collect()
                    })
                    .unwrap_or_default();
                if self.options.sort_keys {
                    entries.sort_by(|a, b| a.0.cmp(&b.0));
                }
                self.map(&entries, depth);
            }
            _ => self.string(&value.to_string()),
        }
    }

    fn sequence(&mut self, items: &[Value], depth: usize) {
        if items.is_empty() {
            self.out.push_str("[]");
            return;
        }
        self.out.push('[');
        for (i, item) in items.iter().enumerate() {
            if i > 0 {
                self.out.push_str(&self.item_sep.clone());
            }
            self.newline(depth + 1);
            self.value(item, depth + 1);
        }
        self.newline(depth);
        self.out.push(']');
    }

    fn map(&mut self, entries: &[(String, Value)], depth: usize) {
        if entries.is_empty() {
            self.out.push_str("{}");
            return;
        }
        self.out.push('{');
        for (i, (key, item)) in entries.iter().enumerate() {
            if i > 0 {
                self.out.push_str(&self.item_sep.clone());
            }
            self.newline(depth + 1);
            self.string(key);
            self.out.push_str(&self.key_sep.clone());
            self.value(item, depth + 1);
        }
        self.newline(depth);
        self.out.push('}');
    }

    fn newline(&mut self, depth: usize) {
        if let Some(indent) = &self.options.indent {
            self.out.push('\n');
            for _ in 0..depth {
                self.out.push_str(indent);
            }
        }
    }

    fn string(&mut self, s: &str) {
        self.out.push('"');
        for c in s.chars() {
            match c {
                '"' => self.out.push_str("\\\""),
                '\\' => self.out.push_str("\\\\"),
                '\n' => self.out.push_str("\\n"),
                '\r' => self.out.push_str("\\r"),
                '\t' => self.out.push_str("\\t"),
                '\u{08}' => self.out.push_str("\\b"),
                '\u{0c}' => self.out.push_str("\\f"),
                c if (c as u32) < 0x20 || (self.options.ensure_ascii && !c.is_ascii()) => {
                    let mut units = [0u16; 2];
                    for unit in c.encode_utf16(&mut units) {
                        self.out.push_str(&format!("\\u{unit:04x}"));
                    }
                }
                c => self.out.push(c),
            }
        }
        self.out.push('"');
    }
}

/// A float as Python's `repr` writes it: the shortest digits that read back
/// the same, positional between 1e-4 and 1e16, exponent form (`1e-05`,
/// `1.5e+16`) outside, and always with a `.0` when it is whole.
fn float_repr(f: f64) -> String {
    if f.is_nan() {
        return "NaN".to_owned();
    }
    if f.is_infinite() {
        return if f > 0.0 { "Infinity" } else { "-Infinity" }.to_owned();
    }
    if f == 0.0 {
        return if f.is_sign_negative() { "-0.0" } else { "0.0" }.to_owned();
    }
    let sci = format!("{f:e}");
    let (mantissa, exponent) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exponent: i32 = exponent.parse().unwrap_or(0);
    if (-4..16).contains(&exponent) {
        let positional = format!("{f}");
        if positional.contains('.') {
            positional
        } else {
            format!("{positional}.0")
        }
    } else {
        let sign = if exponent < 0 { '-' } else { '+' };
        format!("{mantissa}e{sign}{:02}", exponent.abs())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minijinja value from JSON text, keeping the text's key order.
    fn json(text: &str) -> Value {
        serde_json::from_str(text).unwrap()
    }

    #[test]
    fn writes_like_python_json_dumps() {
        // Expected strings are Python 3's json.dumps output for the same values.
        let value = json(r#"{"b": "é<tag>\"\n", "a": [1, 2.5, true, null], "c": {}, "d": []}"#);
        assert_eq!(
            dumps(&value, &DumpOptions::default()),
            r#"{"b": "é<tag>\"\n", "a": [1, 2.5, true, null], "c": {}, "d": []}"#
        );
        assert_eq!(
            dumps(
                &value,
                &DumpOptions {
                    indent: Some("  ".into()),
                    ..Default::default()
                }
            ),
            "{\n  \"b\": \"é<tag>\\\"\\n\",\n  \"a\": [\n    1,\n    2.5,\n    true,\n    null\n  ],\n  \"c\": {},\n  \"d\": []\n}"
        );
        assert_eq!(
            dumps(
                &json(r#"{"b": 1, "a": "ü"}"#),
                &DumpOptions {
                    sort_keys: true,
                    ensure_ascii: true,
                    ..Default::default()
                }
            ),
            r#"{"a": "\u00fc", "b": 1}"#
        );
        assert_eq!(
            dumps(
                &json(r#"{"a": [1, 2]}"#),
                &DumpOptions {
                    separators: Some((",".into(), ":".into())),
                    ..Default::default()
                }
            ),
            r#"{"a":[1,2]}"#
        );
    }

    #[test]
    fn floats_like_python_repr() {
        let cases = [
            (1.0, "1.0"),
            (0.5, "0.5"),
            (-2.0, "-2.0"),
            (0.0001, "0.0001"),
            (0.00001, "1e-05"),
            (1.5e-7, "1.5e-07"),
            (123456789.125, "123456789.125"),
            (1e16, "1e+16"),
            (1.25e22, "1.25e+22"),
            (0.1 + 0.2, "0.30000000000000004"),
        ];
        let got: Vec<(f64, String)> = cases.iter().map(|(f, _)| (*f, float_repr(*f))).collect();
        let want: Vec<(f64, String)> = cases.iter().map(|(f, s)| (*f, s.to_string())).collect();
        assert_eq!(got, want);
    }
}
