//! Grammars in llama.cpp's GBNF that constrain decoding, so that a model
//! answers in a shape the API promised: JSON matching a schema
//! (`response_format`), any JSON object (`json_object`), or a tool call in
//! the model's own syntax with a real tool's name and arguments that match
//! that tool's parameters (`tool_choice: "required"` or a named function).
//!
//! The JSON rules follow llama.cpp's `json-schema-to-grammar` so that
//! grammars behave as users of llama-server expect, for a practical subset
//! of JSON Schema: objects with `properties`, `required` and
//! `additionalProperties`; strings with `enum`, `const`, `minLength` and
//! `maxLength`; numbers, integers, booleans, null; arrays with `items`,
//! `prefixItems`, `minItems` and `maxItems`; `anyOf`, `oneOf`, `allOf` of
//! objects, type lists, and local `$ref`s. Anything else (patterns, formats,
//! numeric bounds) is accepted as any value of its type, and an unknown
//! schema as any JSON value. Whitespace between tokens is bounded (a space,
//! or a newline or two and up to 20 indent characters), and numbers have
//! bounded digits, so that a small model cannot loop on either; properties
//! are written in the schema's order.

use std::collections::{HashMap, HashSet};

use serde_json::{Map, Value};

use super::tools::ToolFormat;
use super::ChatError;

/// What `tool_choice` demands, when it demands a call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolChoice {
    /// `"required"`: a call of any of the tools.
    Required,
    /// `{"type": "function", "function": {"name": …}}`: a call of that tool.
    Named(String),
}

/// A grammar for JSON that matches `schema`.
pub fn json_schema_to_gbnf(schema: &Value) -> Result<String, ChatError> {
    let mut builder = Builder::new(schema);
    let body = builder.expression(schema, "root")?;
    builder.set_root(body);
    Ok(builder.finish())
}

/// A grammar for any JSON object (`response_format: {"type": "json_object"}`).
pub fn json_object_gbnf() -> String {
    let mut builder = Builder::new(&Value::Null);
    let object = builder.primitive("object");
    builder.set_root(object);
    builder.finish()
}

/// A grammar for exactly one call, in `format`'s syntax, of one of `tools`
/// (OpenAI tool objects) as `choice` allows: the name is one of the allowed
/// tools' names and the arguments match that tool's `parameters`.
pub fn tool_call_gbnf(
    format: ToolFormat,
    tools: &[Value],
    choice: &ToolChoice,
) -> Result<String, ChatError> {
    let mut functions = Vec::new();
    for (index, tool) in tools.iter().enumerate() {
        let function = tool
            .get("function")
            .filter(|f| f.is_object())
            .unwrap_or(tool);
        let name = function
            .get("name")
            .and_then(Value::as_str)
            .ok_or_else(|| ChatError::InvalidTool {
                index,
                reason: "\"function.name\" must be a string".into(),
            })?;
        functions.push((name, function.get("parameters")));
    }
    let allowed: Vec<(usize, &str, Option<&Value>)> = match choice {
        ToolChoice::Required => {
            if functions.is_empty() {
                return Err(ChatError::NoTools);
            }
            functions
                .iter()
                .enumerate()
                .map(|(i, (name, params))| (i, *name, *params))
                .collect()
        }
        ToolChoice::Named(wanted) => {
            let (i, (name, params)) = functions
                .iter()
                .enumerate()
                .find(|(_, (name, _))| name == wanted)
                .ok_or_else(|| ChatError::UnknownTool(wanted.clone()))?;
            vec![(i, *name, *params)]
        }
    };

    let mut builder = Builder::new(&Value::Null);
    let mut calls = Vec::new();
    for (i, name, parameters) in allowed {
        // Each tool's `$ref`s point into its own parameters.
        builder.schema_root = parameters.cloned().unwrap_or(Value::Null);
        builder.refs.clear();
        let args = match parameters {
            Some(schema) => builder
                .visit(schema, &format!("args-{i}"))
                .map_err(|e| match e {
                    ChatError::Schema(reason) => ChatError::InvalidTool {
                        index: i,
                        reason: format!("its parameters schema cannot be used: {reason}"),
                    },
                    other => other,
                })?,
            None => builder.primitive("object"),
        };
        let head = format!(
            "{{\"name\": {}, \"{}\": ",
            json_string(name),
            format.arguments_key()
        );
        let call = builder.add_rule(
            &format!("call-{i}"),
            format!("{} {args} \"}}\"", gbnf_literal(&head)),
        );
        calls.push(call);
    }
    let call = if calls.len() == 1 {
        calls.remove(0)
    } else {
        builder.add_rule("call", calls.join(" | "))
    };
    let root = match format {
        ToolFormat::Hermes => format!(
            "{} {call} {}",
            gbnf_literal("<tool_call>\n"),
            gbnf_literal("\n</tool_call>")
        ),
        ToolFormat::Mistral => {
            format!("{} \" \"? \"[\" {call} \"]\"", gbnf_literal("[TOOL_CALLS]"))
        }
        ToolFormat::Llama3 | ToolFormat::Generic => call,
    };
    builder.set_root(root);
    Ok(builder.finish())
}

/// The shared JSON rules, as llama.cpp's json-schema-to-grammar writes them:
/// (name, body, rules it uses).
const PRIMITIVES: &[(&str, &str, &[&str])] = &[
    ("space", r#"| " " | "\n"{1,2} [ \t]{0,20}"#, &[]),
    ("boolean", r#"("true" | "false") space"#, &["space"]),
    ("null", r#""null" space"#, &["space"]),
    ("integral-part", r#"[0] | [1-9] [0-9]{0,15}"#, &[]),
    ("decimal-part", r#"[0-9]{1,16}"#, &[]),
    (
        "integer",
        r#"("-"? integral-part) space"#,
        &["integral-part", "space"],
    ),
    (
        "number",
        r#"("-"? integral-part) ("." decimal-part)? ([eE] [-+]? integral-part)? space"#,
        &["integral-part", "decimal-part", "space"],
    ),
    (
        "char",
        r#"[^"\\\x7F\x00-\x1F] | [\\] (["\\bfnrt] | "u" [0-9a-fA-F]{4})"#,
        &[],
    ),
    ("string", r#""\"" char* "\"" space"#, &["char", "space"]),
    (
        "value",
        r#"object | array | string | number | boolean | null"#,
        &["object", "array", "string", "number", "boolean", "null"],
    ),
    (
        "object",
        r#""{" space ( string ":" space value ("," space string ":" space value)* )? "}" space"#,
        &["space", "string", "value"],
    ),
    (
        "array",
        r#""[" space ( value ("," space value)* )? "]" space"#,
        &["space", "value"],
    ),
];

struct Builder {
    /// Rules in the order they were made; `None` while a `$ref` rule is
    /// being built.
    rules: Vec<(String, Option<String>)>,
    by_body: HashMap<String, String>,
    names: HashSet<String>,
    schema_root: Value,
    refs: HashMap<String, String>,
}

impl Builder {
    fn new(schema_root: &Value) -> Builder {
        let mut names: HashSet<String> = PRIMITIVES.iter().map(|p| p.0.to_owned()).collect();
        names.insert("root".to_owned());
        Builder {
            rules: Vec::new(),
            by_body: HashMap::new(),
            names,
            schema_root: schema_root.clone(),
            refs: HashMap::new(),
        }
    }

    fn set_root(&mut self, body: String) {
        self.rules.insert(0, ("root".to_owned(), Some(body)));
    }

    fn finish(self) -> String {
        let mut out = String::new();
        for (name, body) in self.rules {
            out.push_str(&name);
            out.push_str(" ::= ");
            out.push_str(body.as_deref().unwrap_or_default());
            out.push('\n');
        }
        out
    }

    /// A shared rule, added (with the rules it uses) the first time.
    fn primitive(&mut self, name: &str) -> String {
        if !self.rules.iter().any(|(n, _)| n == name) {
            if let Some((_, body, deps)) = PRIMITIVES.iter().find(|p| p.0 == name) {
                self.rules.push((name.to_owned(), Some((*body).to_owned())));
                for dep in *deps {
                    self.primitive(dep);
                }
            }
        }
        name.to_owned()
    }

    /// A new rule named after `hint` (or an existing rule with the same body).
    fn add_rule(&mut self, hint: &str, body: String) -> String {
        if let Some(name) = self.by_body.get(&body) {
            return name.clone();
        }
        let name = self.fresh_name(hint);
        self.by_body.insert(body.clone(), name.clone());
        self.rules.push((name.clone(), Some(body)));
        name
    }

    fn fresh_name(&mut self, hint: &str) -> String {
        let mut base: String = hint
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect();
        while base.contains("--") {
            base = base.replace("--", "-");
        }
        let base = base.trim_matches('-');
        let base = if base.is_empty() { "r" } else { base };
        let mut name = base.to_owned();
        let mut n = 1;
        while self.names.contains(&name) {
            name = format!("{base}-{n}");
            n += 1;
        }
        self.names.insert(name.clone());
        name
    }

    /// A rule (its name) for values matching `schema`.
    fn visit(&mut self, schema: &Value, hint: &str) -> Result<String, ChatError> {
        let expression = self.expression(schema, hint)?;
        if expression
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-')
        {
            Ok(expression)
        } else {
            Ok(self.add_rule(hint, expression))
        }
    }

    /// A GBNF expression (a rule's body, or the name of a rule) for values
    /// matching `schema`; rules for its parts are named after `hint`.
    fn expression(&mut self, schema: &Value, hint: &str) -> Result<String, ChatError> {
        let object = match schema {
            Value::Bool(true) => return Ok(self.primitive("value")),
            Value::Bool(false) => {
                return Err(ChatError::Schema(format!(
                    "{hint}: the schema `false` accepts no value"
                )))
            }
            Value::Object(object) => object,
            _ => {
                return Err(ChatError::Schema(format!(
                    "{hint}: a schema must be a JSON object or a boolean"
                )))
            }
        };
        if let Some(reference) = object.get("$ref") {
            return self.reference(reference, hint);
        }
        if let Some(value) = object.get("const") {
            self.primitive("space");
            return Ok(format!("{} space", json_literal(value)?));
        }
        if let Some(values) = object.get("enum") {
            let values = values
                .as_array()
                .ok_or_else(|| ChatError::Schema(format!("{hint}: \"enum\" must be a list")))?;
            if values.is_empty() {
                return Err(ChatError::Schema(format!("{hint}: \"enum\" is empty")));
            }
            let alternatives = values
                .iter()
                .map(json_literal)
                .collect::<Result<Vec<_>, _>>()?
                .join(" | ");
            self.primitive("space");
            return Ok(format!("({alternatives}) space"));
        }
        for key in ["anyOf", "oneOf"] {
            if let Some(options) = object.get(key) {
                let options = options.as_array().ok_or_else(|| {
                    ChatError::Schema(format!("{hint}: \"{key}\" must be a list"))
                })?;
                let mut alternatives = Vec::new();
                for (i, option) in options.iter().enumerate() {
                    let merged = merge_siblings(object, option, key);
                    alternatives.push(self.visit(&merged, &format!("{hint}-{i}"))?);
                }
                if alternatives.is_empty() {
                    return Err(ChatError::Schema(format!("{hint}: \"{key}\" is empty")));
                }
                return Ok(alternatives.join(" | "));
            }
        }
        if let Some(all) = object.get("allOf") {
            let merged = self.merge_all_of(object, all, hint)?;
            return self.expression(&merged, hint);
        }
        match object.get("type") {
            Some(Value::Array(types)) => {
                let mut alternatives = Vec::new();
                for kind in types {
                    let mut one = object.clone();
                    one.insert("type".into(), kind.clone());
                    let name = kind.as_str().unwrap_or("value");
                    alternatives.push(self.visit(&Value::Object(one), &format!("{hint}-{name}"))?);
                }
                if alternatives.is_empty() {
                    return Ok(self.primitive("value"));
                }
                Ok(alternatives.join(" | "))
            }
            Some(Value::String(kind)) => self.typed(kind, object, hint),
            Some(_) => Err(ChatError::Schema(format!(
                "{hint}: \"type\" must be a string or a list of strings"
            ))),
            None if object.contains_key("properties")
                || object.contains_key("additionalProperties") =>
            {
                self.typed("object", object, hint)
            }
            None if object.contains_key("items") || object.contains_key("prefixItems") => {
                self.typed("array", object, hint)
            }
            None => Ok(self.primitive("value")),
        }
    }

    fn typed(
        &mut self,
        kind: &str,
        object: &Map<String, Value>,
        hint: &str,
    ) -> Result<String, ChatError> {
        match kind {
            "string" => {
                let min = count(object, "minLength", hint)?;
                let max = count(object, "maxLength", hint)?;
                if min.is_none() && max.is_none() {
                    return Ok(self.primitive("string"));
                }
                self.primitive("char");
                self.primitive("space");
                let chars = repetition("char", min.unwrap_or(0), max);
                Ok(format!("\"\\\"\" {chars} \"\\\"\" space"))
            }
            "integer" => Ok(self.primitive("integer")),
            "number" => Ok(self.primitive("number")),
            "boolean" => Ok(self.primitive("boolean")),
            "null" => Ok(self.primitive("null")),
            "array" => self.array(object, hint),
            "object" => self.object(object, hint),
            _ => Ok(self.primitive("value")),
        }
    }

    fn array(&mut self, object: &Map<String, Value>, hint: &str) -> Result<String, ChatError> {
        self.primitive("space");
        let tuple = match (object.get("prefixItems"), object.get("items")) {
            (Some(Value::Array(items)), _) | (None, Some(Value::Array(items))) => Some(items),
            _ => None,
        };
        if let Some(items) = tuple {
            let mut parts = Vec::new();
            for (i, item) in items.iter().enumerate() {
                parts.push(self.visit(item, &format!("{hint}-{i}"))?);
            }
            let body = if parts.is_empty() {
                "\"[\" space \"]\" space".to_owned()
            } else {
                format!("\"[\" space {} \"]\" space", parts.join(" \",\" space "))
            };
            return Ok(body);
        }
        let item = match object.get("items") {
            Some(items) => self.visit(items, &format!("{hint}-item"))?,
            None => self.primitive("value"),
        };
        let min = count(object, "minItems", hint)?.unwrap_or(0);
        let max = count(object, "maxItems", hint)?;
        if max.is_some_and(|max| max < min) {
            return Err(ChatError::Schema(format!(
                "{hint}: maxItems is less than minItems"
            )));
        }
        let body = if max == Some(0) {
            "\"[\" space \"]\" space".to_owned()
        } else {
            let more = repetition(
                &format!("\",\" space {item}"),
                min.saturating_sub(1),
                max.map(|m| m - 1),
            );
            let list = if more.is_empty() {
                item.clone()
            } else {
                format!("{item} {more}")
            };
            if min == 0 {
                format!("\"[\" space ( {list} )? \"]\" space")
            } else {
                format!("\"[\" space {list} \"]\" space")
            }
        };
        Ok(body)
    }

    fn object(&mut self, object: &Map<String, Value>, hint: &str) -> Result<String, ChatError> {
        self.primitive("space");
        let properties = match object.get("properties") {
            None => None,
            Some(Value::Object(p)) => Some(p),
            Some(_) => {
                return Err(ChatError::Schema(format!(
                    "{hint}: \"properties\" must be an object"
                )))
            }
        };
        let required: HashSet<&str> = object
            .get("required")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        // Extra keys: when allowed outright, or (as llama.cpp does) when the
        // schema lists no properties and does not forbid them.
        let additional = match (object.get("additionalProperties"), properties) {
            (Some(Value::Bool(false)), _) => None,
            (Some(Value::Bool(true)), _) | (None, None) => Some(self.primitive("value")),
            (Some(schema @ Value::Object(_)), _) => {
                Some(self.visit(schema, &format!("{hint}-additional"))?)
            }
            (Some(_), _) => {
                return Err(ChatError::Schema(format!(
                    "{hint}: \"additionalProperties\" must be a boolean or a schema"
                )))
            }
            (None, Some(_)) => None,
        };
        let additional_kv = match additional {
            Some(value) => {
                self.primitive("string");
                Some(self.add_rule(
                    &format!("{hint}-additional-kv"),
                    format!("string \":\" space {value}"),
                ))
            }
            None => None,
        };

        let mut items: Vec<(String, bool)> = Vec::new();
        for (key, schema) in properties.into_iter().flatten() {
            let value = self.visit(schema, &format!("{hint}-{key}"))?;
            let kv = self.add_rule(
                &format!("{hint}-{key}-kv"),
                format!(
                    "{} space \":\" space {value}",
                    gbnf_literal(&json_string(key))
                ),
            );
            items.push((kv, required.contains(key.as_str())));
        }

        let more_additional = additional_kv
            .as_ref()
            .map(|kv| format!(" (\",\" space {kv})*"))
            .unwrap_or_default();
        let inner = match items.iter().position(|(_, req)| *req) {
            Some(first) => {
                let mut parts: Vec<String> = items[..first]
                    .iter()
                    .map(|(kv, _)| format!("({kv} \",\" space)?"))
                    .collect();
                parts.push(items[first].0.clone());
                for (kv, req) in &items[first + 1..] {
                    parts.push(if *req {
                        format!("\",\" space {kv}")
                    } else {
                        format!("(\",\" space {kv})?")
                    });
                }
                format!(" {}{more_additional}", parts.join(" "))
            }
            None => {
                let mut alternatives: Vec<String> = (0..items.len())
                    .map(|start| {
                        let mut parts = vec![items[start].0.clone()];
                        parts.extend(
                            items[start + 1..]
                                .iter()
                                .map(|(kv, _)| format!("(\",\" space {kv})?")),
                        );
                        format!("{}{more_additional}", parts.join(" "))
                    })
                    .collect();
                if let Some(kv) = &additional_kv {
                    alternatives.push(format!("{kv}{more_additional}"));
                }
                if alternatives.is_empty() {
                    String::new()
                } else {
                    format!(" ( {} )?", alternatives.join(" | "))
                }
            }
        };
        Ok(format!("\"{{\" space{inner} \"}}\" space"))
    }

    /// A local `$ref` (`#`, `#/$defs/X`, `#/definitions/X`, any JSON
    /// pointer into the schema): one rule per target, so recursion works.
    fn reference(&mut self, reference: &Value, hint: &str) -> Result<String, ChatError> {
        let reference = reference
            .as_str()
            .ok_or_else(|| ChatError::Schema(format!("{hint}: \"$ref\" must be a string")))?;
        if let Some(name) = self.refs.get(reference) {
            return Ok(name.clone());
        }
        let pointer = reference.strip_prefix('#').ok_or_else(|| {
            ChatError::Schema(format!(
                "{hint}: only local references (\"#/...\") are supported, not {reference:?}"
            ))
        })?;
        let target =
            self.schema_root.pointer(pointer).cloned().ok_or_else(|| {
                ChatError::Schema(format!("{hint}: {reference:?} points at nothing"))
            })?;
        let last = pointer.rsplit('/').next().filter(|s| !s.is_empty());
        let name = self.fresh_name(&format!("ref-{}", last.unwrap_or("root")));
        self.refs.insert(reference.to_owned(), name.clone());
        let slot = self.rules.len();
        self.rules.push((name.clone(), None));
        let body = self.expression(&target, &name)?;
        self.rules[slot].1 = Some(body);
        Ok(name)
    }

    /// `allOf`: the listed object schemas merged into one (properties and
    /// required lists joined), with the schema's own keywords.
    fn merge_all_of(
        &mut self,
        object: &Map<String, Value>,
        all: &Value,
        hint: &str,
    ) -> Result<Value, ChatError> {
        let parts = all
            .as_array()
            .ok_or_else(|| ChatError::Schema(format!("{hint}: \"allOf\" must be a list")))?;
        let mut merged = object.clone();
        merged.remove("allOf");
        let mut properties = match merged.remove("properties") {
            Some(Value::Object(p)) => p,
            _ => Map::new(),
        };
        let mut required: Vec<Value> = match merged.remove("required") {
            Some(Value::Array(r)) => r,
            _ => Vec::new(),
        };
        for part in parts {
            let mut part = part.clone();
            // Resolve a referenced part so that its properties merge too.
            for _ in 0..16 {
                let Some(reference) = part.get("$ref").and_then(Value::as_str) else {
                    break;
                };
                let pointer = reference.strip_prefix('#').unwrap_or(reference);
                part = self.schema_root.pointer(pointer).cloned().ok_or_else(|| {
                    ChatError::Schema(format!("{hint}: {reference:?} points at nothing"))
                })?;
            }
            let Value::Object(part) = part else {
                continue;
            };
            for (key, value) in part {
                match (key.as_str(), value) {
                    ("properties", Value::Object(p)) => properties.extend(p),
                    ("required", Value::Array(r)) => required.extend(r),
                    ("properties" | "required", _) => {}
                    (_, value) => {
                        merged.entry(key.clone()).or_insert(value);
                    }
                }
            }
        }
        if !properties.is_empty() {
            merged.insert("properties".into(), Value::Object(properties));
            merged
                .entry("type".to_owned())
                .or_insert_with(|| Value::String("object".into()));
        }
        if !required.is_empty() {
            merged.insert("required".into(), Value::Array(required));
        }
        Ok(Value::Object(merged))
    }
}

/// An `anyOf`/`oneOf` option with the keywords its parent states beside the
/// list (a shared `type`, `properties`, …), as JSON Schema composes them.
fn merge_siblings(parent: &Map<String, Value>, option: &Value, list_key: &str) -> Value {
    let Value::Object(option) = option else {
        return option.clone();
    };
    let mut merged = option.clone();
    for (key, value) in parent {
        if key != list_key
            && key != "description"
            && key != "title"
            && key != "$defs"
            && key != "definitions"
        {
            merged.entry(key.clone()).or_insert_with(|| value.clone());
        }
    }
    Value::Object(merged)
}

fn count(object: &Map<String, Value>, key: &str, hint: &str) -> Result<Option<u64>, ChatError> {
    match object.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .or_else(|| {
                v.as_f64()
                    .filter(|f| *f >= 0.0 && f.fract() == 0.0)
                    .map(|f| f as u64)
            })
            .map(Some)
            .ok_or_else(|| ChatError::Schema(format!("{hint}: \"{key}\" must be a whole number"))),
    }
}

/// `item` repeated between `min` and `max` times, in GBNF.
fn repetition(item: &str, min: u64, max: Option<u64>) -> String {
    let item = if item.contains(' ') {
        format!("({item})")
    } else {
        item.to_owned()
    };
    match (min, max) {
        (0, Some(0)) => String::new(),
        (0, None) => format!("{item}*"),
        (1, None) => format!("{item}+"),
        (0, Some(1)) => format!("{item}?"),
        (min, None) => format!("{item}{{{min},}}"),
        (min, Some(max)) if min == max => format!("{item}{{{min}}}"),
        (min, Some(max)) => format!("{item}{{{min},{max}}}"),
    }
}

/// A JSON string literal, `"like this"`.
fn json_string(s: &str) -> String {
    Value::String(s.to_owned()).to_string()
}

/// A JSON value as a GBNF literal that matches exactly its compact JSON text.
fn json_literal(value: &Value) -> Result<String, ChatError> {
    Ok(gbnf_literal(&serde_json::to_string(value).map_err(
        |e| ChatError::Schema(format!("a constant cannot be written as JSON: {e}")),
    )?))
}

/// A GBNF string literal matching `text` exactly.
fn gbnf_literal(text: &str) -> String {
    let mut out = String::from("\"");
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 || c == '\u{7f}' => {
                out.push_str(&format!("\\x{:02X}", c as u32))
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use serde_json::json;

    /// Checks GBNF the way llama.cpp's parser reads it: rules of
    /// `name ::= alternatives`, a rule ending at a newline outside
    /// parentheses; literals, character classes, groups, references and
    /// repetitions well formed; every referenced rule defined once; `root`
    /// present. Returns the rule names in order.
    pub(crate) fn check_gbnf(text: &str) -> Result<Vec<String>, String> {
        let chars: Vec<char> = text.chars().collect();
        let mut at = 0;
        let mut defined: Vec<String> = Vec::new();
        let mut used: Vec<String> = Vec::new();
        let skip_space = |at: &mut usize, newlines: bool| {
            while *at < chars.len() {
                match chars[*at] {
                    ' ' | '\t' => *at += 1,
                    '\r' | '\n' if newlines => *at += 1,
                    '#' => {
                        while *at < chars.len() && chars[*at] != '\n' {
                            *at += 1;
                        }
                    }
                    _ => break,
                }
            }
        };
        let name = |at: &mut usize| -> String {
            let start = *at;
            while *at < chars.len() && (chars[*at].is_ascii_alphanumeric() || chars[*at] == '-') {
                *at += 1;
            }
            chars[start..*at].iter().collect()
        };
        fn escape(chars: &[char], at: &mut usize) -> Result<(), String> {
            *at += 1;
            let c = *chars.get(*at).ok_or("escape at the end")?;
            *at += 1;
            let hex = match c {
                'x' => 2,
                'u' => 4,
                'U' => 8,
                '"' | '\\' | 'n' | 'r' | 't' | '[' | ']' | '-' | '^' => 0,
                other => return Err(format!("unknown escape \\{other}")),
            };
            for _ in 0..hex {
                let h = chars.get(*at).ok_or("short hex escape")?;
                if !h.is_ascii_hexdigit() {
                    return Err(format!("bad hex digit {h:?}"));
                }
                *at += 1;
            }
            Ok(())
        }
        // alternatives := sequence ("|" sequence)*; returns at the rule's end.
        fn alternatives(
            chars: &[char],
            at: &mut usize,
            depth: usize,
            used: &mut Vec<String>,
        ) -> Result<(), String> {
            loop {
                // One sequence.
                loop {
                    while *at < chars.len()
                        && (chars[*at] == ' '
                            || chars[*at] == '\t'
                            || (depth > 0 && (chars[*at] == '\n' || chars[*at] == '\r')))
                    {
                        *at += 1;
                    }
                    let Some(&c) = chars.get(*at) else {
                        return Ok(());
                    };
                    match c {
                        '"' => {
                            *at += 1;
                            loop {
                                match chars.get(*at) {
                                    None | Some('\n') => return Err("unterminated literal".into()),
                                    Some('"') => break,
                                    Some('\\') => escape(chars, at)?,
                                    Some(_) => *at += 1,
                                }
                            }
                            *at += 1;
                        }
                        '[' => {
                            *at += 1;
                            if chars.get(*at) == Some(&'^') {
                                *at += 1;
                            }
                            let mut empty = true;
                            loop {
                                match chars.get(*at) {
                                    None | Some('\n') => return Err("unterminated class".into()),
                                    Some(']') if !empty => break,
                                    Some('\\') => escape(chars, at)?,
                                    Some(_) => *at += 1,
                                }
                                empty = false;
                            }
                            *at += 1;
                        }
                        '(' => {
                            *at += 1;
                            alternatives(chars, at, depth + 1, used)?;
                            if chars.get(*at) != Some(&')') {
                                return Err(format!("expected ')' at {at}"));
                            }
                            *at += 1;
                        }
                        '.' => *at += 1,
                        c if c.is_ascii_alphanumeric() || c == '-' => {
                            let start = *at;
                            while *at < chars.len()
                                && (chars[*at].is_ascii_alphanumeric() || chars[*at] == '-')
                            {
                                *at += 1;
                            }
                            let reference: String = chars[start..*at].iter().collect();
                            let mut probe = *at;
                            while probe < chars.len() && chars[probe] == ' ' {
                                probe += 1;
                            }
                            if chars[probe..].starts_with(&[':', ':', '=']) {
                                return Err(format!("rule {reference} starts inside a rule"));
                            }
                            used.push(reference);
                        }
                        '|' | ')' | '\n' | '\r' => break,
                        other => return Err(format!("unexpected {other:?} at {at}")),
                    }
                    // A repetition after the element.
                    match chars.get(*at) {
                        Some('*' | '+' | '?') => *at += 1,
                        Some('{') => {
                            let close = chars[*at..]
                                .iter()
                                .position(|&c| c == '}')
                                .ok_or("unterminated repetition")?;
                            let inside: String = chars[*at + 1..*at + close].iter().collect();
                            let (min, max) = match inside.split_once(',') {
                                Some((a, b)) => (a.trim(), Some(b.trim())),
                                None => (inside.trim(), None),
                            };
                            let min: u64 = min
                                .parse()
                                .map_err(|_| format!("bad repetition {{{inside}}}"))?;
                            if let Some(max) = max.filter(|m| !m.is_empty()) {
                                let max: u64 = max
                                    .parse()
                                    .map_err(|_| format!("bad repetition {{{inside}}}"))?;
                                if max < min {
                                    return Err(format!("bad repetition {{{inside}}}"));
                                }
                            }
                            *at += close + 1;
                        }
                        _ => {}
                    }
                }
                if chars.get(*at) == Some(&'|') {
                    *at += 1;
                    continue;
                }
                return Ok(());
            }
        }
        loop {
            skip_space(&mut at, true);
            if at >= chars.len() {
                break;
            }
            let rule = name(&mut at);
            if rule.is_empty() {
                return Err(format!("expected a rule name at {at}"));
            }
            skip_space(&mut at, false);
            if !chars[at..].starts_with(&[':', ':', '=']) {
                return Err(format!("expected ::= after {rule}"));
            }
            at += 3;
            alternatives(&chars, &mut at, 0, &mut used)?;
            if defined.contains(&rule) {
                return Err(format!("rule {rule} defined twice"));
            }
            defined.push(rule);
        }
        if !defined.iter().any(|r| r == "root") {
            return Err("no root rule".into());
        }
        if let Some(missing) = used.iter().find(|u| !defined.contains(u)) {
            return Err(format!("rule {missing} is used but not defined"));
        }
        Ok(defined)
    }

    #[test]
    fn the_checker_catches_broken_grammars() {
        let got: Vec<Result<Vec<String>, String>> = [
            "root ::= \"a\" b\nb ::= [a-z]{1,3} | ( \"x\" \"y\" )*\n",
            "root ::= \"a\" missing\n",
            "root ::= (\"a\"\n",
            "root ::= \"a\nb\"\n",
            "item ::= \"a\"\n",
            "root ::= [a-z]{3,1}\n",
        ]
        .iter()
        .map(|g| check_gbnf(g))
        .collect();
        assert_eq!(
            got,
            vec![
                Ok(vec!["root".to_owned(), "b".to_owned()]),
                Err("rule missing is used but not defined".to_owned()),
                Err("expected ')' at 14".to_owned()),
                Err("unterminated literal".to_owned()),
                Err("no root rule".to_owned()),
                Err("bad repetition {3,1}".to_owned()),
            ]
        );
    }

    #[test]
    fn a_small_schema_gives_this_grammar() {
        // Keys in alphabetical order: serde_json may or may not keep
        // insertion order, and the grammar follows the map's order.
        let schema = json!({
            "additionalProperties": false,
            "properties": {
                "age": {"type": "integer"},
                "name": {"type": "string"},
                "unit": {"enum": ["C", "F"]},
                "tags": {"items": {"type": "string"}, "maxItems": 3, "type": "array"}
            },
            "required": ["name"],
            "type": "object"
        });
        let want = concat!(
            "root ::= \"{\" space (root-age-kv \",\" space)? root-name-kv (\",\" space root-tags-kv)? (\",\" space root-unit-kv)? \"}\" space\n",
            "space ::= | \" \" | \"\\n\"{1,2} [ \\t]{0,20}\n",
            "integer ::= (\"-\"? integral-part) space\n",
            "integral-part ::= [0] | [1-9] [0-9]{0,15}\n",
            "root-age-kv ::= \"\\\"age\\\"\" space \":\" space integer\n",
            "string ::= \"\\\"\" char* \"\\\"\" space\n",
            "char ::= [^\"\\\\\\x7F\\x00-\\x1F] | [\\\\] ([\"\\\\bfnrt] | \"u\" [0-9a-fA-F]{4})\n",
            "root-name-kv ::= \"\\\"name\\\"\" space \":\" space string\n",
            "root-tags ::= \"[\" space ( string (\",\" space string){0,2} )? \"]\" space\n",
            "root-tags-kv ::= \"\\\"tags\\\"\" space \":\" space root-tags\n",
            "root-unit ::= (\"\\\"C\\\"\" | \"\\\"F\\\"\") space\n",
            "root-unit-kv ::= \"\\\"unit\\\"\" space \":\" space root-unit\n",
        );
        assert_eq!(json_schema_to_gbnf(&schema).unwrap(), want);
        check_gbnf(want).unwrap();
    }

    #[test]
    fn json_object_grammar() {
        let want = concat!(
            "root ::= object\n",
            "object ::= \"{\" space ( string \":\" space value (\",\" space string \":\" space value)* )? \"}\" space\n",
            "space ::= | \" \" | \"\\n\"{1,2} [ \\t]{0,20}\n",
            "string ::= \"\\\"\" char* \"\\\"\" space\n",
            "char ::= [^\"\\\\\\x7F\\x00-\\x1F] | [\\\\] ([\"\\\\bfnrt] | \"u\" [0-9a-fA-F]{4})\n",
            "value ::= object | array | string | number | boolean | null\n",
            "array ::= \"[\" space ( value (\",\" space value)* )? \"]\" space\n",
            "number ::= (\"-\"? integral-part) (\".\" decimal-part)? ([eE] [-+]? integral-part)? space\n",
            "integral-part ::= [0] | [1-9] [0-9]{0,15}\n",
            "decimal-part ::= [0-9]{1,16}\n",
            "boolean ::= (\"true\" | \"false\") space\n",
            "null ::= \"null\" space\n",
        );
        assert_eq!(json_object_gbnf(), want);
    }

    pub(crate) fn weather_tools() -> Vec<Value> {
        vec![
            json!({"type": "function", "function": {
                "name": "get_weather",
                "description": "Get the current weather in a city.",
                "parameters": {
                    "type": "object",
                    "properties": {
                        "city": {"type": "string"},
                        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}
                    },
                    "required": ["city"]
                }
            }}),
            json!({"type": "function", "function": {"name": "now"}}),
        ]
    }

    #[test]
    fn a_named_tool_call_grammar_for_each_format() {
        let tools = weather_tools();
        let choice = ToolChoice::Named("get_weather".into());
        let args = concat!(
            "space ::= | \" \" | \"\\n\"{1,2} [ \\t]{0,20}\n",
            "string ::= \"\\\"\" char* \"\\\"\" space\n",
            "char ::= [^\"\\\\\\x7F\\x00-\\x1F] | [\\\\] ([\"\\\\bfnrt] | \"u\" [0-9a-fA-F]{4})\n",
            "args-0-city-kv ::= \"\\\"city\\\"\" space \":\" space string\n",
            "args-0-unit ::= (\"\\\"celsius\\\"\" | \"\\\"fahrenheit\\\"\") space\n",
            "args-0-unit-kv ::= \"\\\"unit\\\"\" space \":\" space args-0-unit\n",
            "args-0 ::= \"{\" space args-0-city-kv (\",\" space args-0-unit-kv)? \"}\" space\n",
        );
        let got: Vec<String> = [
            ToolFormat::Hermes,
            ToolFormat::Llama3,
            ToolFormat::Mistral,
            ToolFormat::Generic,
        ]
        .iter()
        .map(|f| tool_call_gbnf(*f, &tools, &choice).unwrap())
        .collect();
        let call = |key: &str| {
            format!("call-0 ::= \"{{\\\"name\\\": \\\"get_weather\\\", \\\"{key}\\\": \" args-0 \"}}\"\n")
        };
        assert_eq!(
            got,
            vec![
                format!(
                    "root ::= \"<tool_call>\\n\" call-0 \"\\n</tool_call>\"\n{args}{}",
                    call("arguments")
                ),
                format!("root ::= call-0\n{args}{}", call("parameters")),
                format!(
                    "root ::= \"[TOOL_CALLS]\" \" \"? \"[\" call-0 \"]\"\n{args}{}",
                    call("arguments")
                ),
                format!("root ::= call-0\n{args}{}", call("arguments")),
            ]
        );
        for grammar in &got {
            check_gbnf(grammar).unwrap();
        }
    }

    /// Grammars for many schemas and every tool format, for the checks below
    /// and for llama.cpp's own parser in the engine tests.
    pub(crate) fn sample_grammars() -> Vec<(String, String)> {
        let schemas = [
            json!({}),
            json!(true),
            json!({"type": "string", "minLength": 2, "maxLength": 8}),
            json!({"type": "string", "minLength": 1}),
            json!({"type": ["string", "null"]}),
            json!({"const": {"a": [1, "x\n\"y\""]}}),
            json!({"enum": ["a", 1, null, true]}),
            json!({"type": "number"}),
            json!({"type": "array", "items": {"type": "integer"}, "minItems": 2}),
            json!({"type": "array", "items": {"type": "boolean"}, "minItems": 1, "maxItems": 1}),
            json!({"type": "array", "maxItems": 0}),
            json!({"type": "array", "prefixItems": [{"type": "string"}, {"type": "number"}]}),
            json!({"type": "object"}),
            json!({"type": "object", "properties": {}, "additionalProperties": false}),
            json!({"type": "object", "properties": {"a": {"type": "string"}, "b": {"type": "integer"}}}),
            json!({"type": "object", "properties": {"a": {"type": "string"}}, "additionalProperties": {"type": "number"}}),
            json!({"type": "object", "additionalProperties": true, "required": ["x"], "properties": {"x": {"type": "null"}}}),
            json!({"anyOf": [{"type": "string"}, {"type": "object", "properties": {"k": {"type": "boolean"}}, "required": ["k"]}]}),
            json!({"type": "object", "oneOf": [{"properties": {"a": {"type": "string"}}, "required": ["a"]}, {"properties": {"b": {"type": "string"}}, "required": ["b"]}]}),
            json!({"allOf": [{"properties": {"a": {"type": "string"}}, "required": ["a"]}, {"properties": {"b": {"type": "integer"}}}]}),
            json!({
                "$defs": {"node": {"type": "object", "properties": {
                    "value": {"type": "integer"},
                    "children": {"type": "array", "items": {"$ref": "#/$defs/node"}}
                }, "required": ["value"]}},
                "$ref": "#/$defs/node"
            }),
            json!({
                "definitions": {"Point": {"type": "object", "properties": {"x": {"type": "number"}, "y": {"type": "number"}}, "required": ["x", "y"]}},
                "type": "object",
                "properties": {"path": {"type": "array", "items": {"$ref": "#/definitions/Point"}}, "name-with space": {"type": "string"}},
                "required": ["path"]
            }),
            json!({"type": "object", "properties": {"when": {"type": "string", "format": "date-time"}, "n": {"type": "integer", "minimum": 3}, "odd": {"type": "mystery"}}}),
        ];
        let mut grammars: Vec<(String, String)> = schemas
            .iter()
            .map(|s| (s.to_string(), json_schema_to_gbnf(s).unwrap()))
            .collect();
        grammars.push(("json_object".into(), json_object_gbnf()));
        let tools = weather_tools();
        for format in [
            ToolFormat::Hermes,
            ToolFormat::Llama3,
            ToolFormat::Mistral,
            ToolFormat::Generic,
        ] {
            for choice in [ToolChoice::Required, ToolChoice::Named("now".into())] {
                grammars.push((
                    format!("{format:?} {choice:?}"),
                    tool_call_gbnf(format, &tools, &choice).unwrap(),
                ));
            }
        }
        grammars
    }

    #[test]
    fn every_grammar_is_well_formed() {
        let failures: Vec<(String, String, String)> = sample_grammars()
            .into_iter()
            .filter_map(|(what, grammar)| check_gbnf(&grammar).err().map(|e| (what, e, grammar)))
            .collect();
        assert_eq!(failures, vec![]);
    }

    #[test]
    fn recursion_and_references_share_one_rule() {
        let schema = json!({
            "$defs": {"node": {"type": "object", "properties": {
                "next": {"$ref": "#/$defs/node"}
            }}},
            "$ref": "#/$defs/node"
        });
        assert_eq!(
            json_schema_to_gbnf(&schema).unwrap(),
            concat!(
                "root ::= ref-node\n",
                "ref-node ::= \"{\" space ( ref-node-next-kv )? \"}\" space\n",
                "space ::= | \" \" | \"\\n\"{1,2} [ \\t]{0,20}\n",
                "ref-node-next-kv ::= \"\\\"next\\\"\" space \":\" space ref-node\n",
            )
        );
    }

    #[test]
    fn what_cannot_be_made_into_a_grammar_is_refused() {
        let tools = weather_tools();
        let got = vec![
            json_schema_to_gbnf(&json!(false)),
            json_schema_to_gbnf(&json!({"$ref": "#/$defs/missing"})),
            json_schema_to_gbnf(&json!({"$ref": "https://example.com/schema.json"})),
            json_schema_to_gbnf(&json!({"type": "array", "minItems": 3, "maxItems": 1})),
            json_schema_to_gbnf(&json!({"enum": []})),
            json_schema_to_gbnf(&json!(7)),
            tool_call_gbnf(
                ToolFormat::Hermes,
                &tools,
                &ToolChoice::Named("nope".into()),
            ),
            tool_call_gbnf(ToolFormat::Hermes, &[], &ToolChoice::Required),
            tool_call_gbnf(
                ToolFormat::Hermes,
                &[json!({"type": "function", "function": {"name": "f", "parameters": false}})],
                &ToolChoice::Required,
            ),
        ];
        assert_eq!(
            got,
            vec![
                Err(ChatError::Schema("root: the schema `false` accepts no value".into())),
                Err(ChatError::Schema("root: \"#/$defs/missing\" points at nothing".into())),
                Err(ChatError::Schema(
                    "root: only local references (\"#/...\") are supported, not \"https://example.com/schema.json\"".into()
                )),
                Err(ChatError::Schema("root: maxItems is less than minItems".into())),
                Err(ChatError::Schema("root: \"enum\" is empty".into())),
                Err(ChatError::Schema("root: a schema must be a JSON object or a boolean".into())),
                Err(ChatError::UnknownTool("nope".into())),
                Err(ChatError::NoTools),
                Err(ChatError::InvalidTool {
                    index: 0,
                    reason: "its parameters schema cannot be used: args-0: the schema `false` accepts no value".into()
                }),
            ]
        );
    }
}
