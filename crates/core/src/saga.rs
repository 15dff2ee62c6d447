//! Sagas: how a tool's effect is undone when the run fails or is cancelled.
//!
//! A tool declares `compensate: {tool, arguments}`: the tool to call and an
//! argument template. The template is JSON whose strings may hold
//! placeholders `{{call.arguments.<path>}}` (the arguments the original
//! call was made with) and `{{result.<path>}}` (its result, parsed as JSON
//! when it is JSON). A path is dot-separated keys, a number indexing an
//! array; `{{call.arguments}}` and `{{result}}` are the whole value. A
//! string that is exactly one placeholder becomes the value it names (of
//! any JSON type); placeholders inside longer text are replaced by the
//! value's text. Templates are data: nothing is evaluated.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// `compensate:` of a tool: what undoes one of its calls.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Compensate {
    /// The tool to call: a tool of the spec, or an MCP tool as the model
    /// sees it (`<server>__<tool>`, allowed by its server entry).
    pub tool: String,
    /// The argument template (see the module docs).
    #[serde(default = "empty_object")]
    pub arguments: Value,
}

fn empty_object() -> Value {
    Value::Object(Map::new())
}

/// Where a placeholder takes its value from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Root {
    Arguments,
    Result,
}

/// A parsed placeholder: its root and path.
#[derive(Debug, PartialEq, Eq)]
struct Placeholder<'a> {
    root: Root,
    path: Vec<&'a str>,
}

/// One piece of a template string.
#[derive(Debug, PartialEq, Eq)]
enum Piece<'a> {
    Text(&'a str),
    Value(Placeholder<'a>),
}

/// Splits a template string into text and placeholders.
fn pieces(text: &str) -> Result<Vec<Piece<'_>>, String> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find("{{") {
        if start > 0 {
            out.push(Piece::Text(&rest[..start]));
        }
        let after = &rest[start + 2..];
        let Some(end) = after.find("}}") else {
            return Err(format!(
                "`{text}` opens a placeholder with `{{{{` it never closes"
            ));
        };
        out.push(Piece::Value(placeholder(after[..end].trim())?));
        rest = &after[end + 2..];
    }
    if !rest.is_empty() {
        out.push(Piece::Text(rest));
    }
    Ok(out)
}

fn placeholder(inner: &str) -> Result<Placeholder<'_>, String> {
    let (root, rest) = if let Some(rest) = inner.strip_prefix("call.arguments") {
        (Root::Arguments, rest)
    } else if let Some(rest) = inner.strip_prefix("result") {
        (Root::Result, rest)
    } else {
        return Err(format!(
            "`{{{{{inner}}}}}` is not a placeholder: use `{{{{call.arguments.<path>}}}}` or `{{{{result.<path>}}}}`"
        ));
    };
    let path = match rest {
        "" => Vec::new(),
        _ => match rest.strip_prefix('.') {
            Some(path) => path.split('.').collect(),
            None => {
                return Err(format!(
                    "`{{{{{inner}}}}}` is not a placeholder: a path follows `.`"
                ));
            }
        },
    };
    if path.iter().any(|p| p.trim().is_empty()) {
        return Err(format!("`{{{{{inner}}}}}` has an empty path segment"));
    }
    Ok(Placeholder { root, path })
}

/// Checks every placeholder of a template; errors name the field under `at`
/// (`tools[0].compensate.arguments.booking`).
pub fn check_template(template: &Value, at: &str, err: &mut impl FnMut(String, String)) {
    match template {
        Value::String(text) => {
            if let Err(message) = pieces(text) {
                err(at.to_string(), message);
            }
        }
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                check_template(item, &format!("{at}[{i}]"), err);
            }
        }
        Value::Object(map) => {
            for (key, value) in map {
                check_template(value, &format!("{at}.{key}"), err);
            }
        }
        _ => {}
    }
}

/// Fills a template from the original call's arguments and result text.
/// The error names the placeholder that has no value.
pub fn render(template: &Value, arguments: &Value, result: &str) -> Result<Value, String> {
    let result =
        serde_json::from_str::<Value>(result).unwrap_or_else(|_| Value::String(result.to_string()));
    fill(template, arguments, &result)
}

fn fill(template: &Value, arguments: &Value, result: &Value) -> Result<Value, String> {
    match template {
        Value::String(text) => {
            let pieces = pieces(text)?;
            if let [Piece::Value(p)] = pieces.as_slice() {
                return lookup(p, arguments, result).cloned();
            }
            let mut out = String::new();
            for piece in pieces {
                match piece {
                    Piece::Text(t) => out.push_str(t),
                    Piece::Value(p) => match lookup(&p, arguments, result)? {
                        Value::String(s) => out.push_str(s),
                        other => out.push_str(&other.to_string()),
                    },
                }
            }
            Ok(Value::String(out))
        }
        Value::Array(items) => items
            .iter()
            .map(|item| fill(item, arguments, result))
            .collect::<Result<Vec<_>, _>>()
            .map(Value::Array),
        Value::Object(map) => {
            let mut out = Map::new();
            for (key, value) in map {
                out.insert(key.clone(), fill(value, arguments, result)?);
            }
            Ok(Value::Object(out))
        }
        other => Ok(other.clone()),
    }
}

fn lookup<'v>(
    p: &Placeholder<'_>,
    arguments: &'v Value,
    result: &'v Value,
) -> Result<&'v Value, String> {
    let (mut value, name) = match p.root {
        Root::Arguments => (arguments, "call.arguments"),
        Root::Result => (result, "result"),
    };
    let mut at = name.to_string();
    for key in &p.path {
        let next = match value {
            Value::Object(map) => map.get(*key),
            Value::Array(items) => key.parse::<usize>().ok().and_then(|i| items.get(i)),
            _ => None,
        };
        let Some(next) = next else {
            return Err(format!(
                "`{at}` has no `{key}` (the template needs `{{{{{name}.{}}}}}`)",
                p.path.join(".")
            ));
        };
        value = next;
        at.push('.');
        at.push_str(key);
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn placeholders_fill_values_and_text() {
        let template = json!({
            "booking": "{{result.booking.id}}",
            "seats": "{{ call.arguments.seats }}",
            "note": "undo {{call.arguments.flight}} for {{result.booking.id}}",
            "first": "{{result.legs.0}}",
            "fixed": [1, "plain", {"all": "{{call.arguments}}"}],
        });
        let arguments = json!({"flight": "LH1", "seats": 2});
        let result = r#"{"booking": {"id": 42}, "legs": ["FRA", "JFK"]}"#;
        let rendered = render(&template, &arguments, result).unwrap();
        assert_eq!(
            rendered,
            json!({
                "booking": 42,
                "seats": 2,
                "note": "undo LH1 for 42",
                "first": "FRA",
                "fixed": [1, "plain", {"all": {"flight": "LH1", "seats": 2}}],
            })
        );
        // A result that is not JSON is a string.
        let text = render(&json!({"r": "{{result}}"}), &arguments, "ok, booked").unwrap();
        assert_eq!(text, json!({"r": "ok, booked"}));
    }

    #[test]
    fn a_missing_value_names_the_placeholder() {
        let error = render(
            &json!({"id": "{{result.booking.id}}"}),
            &json!({}),
            r#"{"booking": {}}"#,
        )
        .unwrap_err();
        assert!(error.contains("`result.booking` has no `id`"), "{error}");
        let error = render(&json!("{{result.x}}"), &json!({}), "plain text").unwrap_err();
        assert!(error.contains("`result` has no `x`"), "{error}");
    }

    #[test]
    fn bad_placeholders_are_refused_with_their_field() {
        let mut errors = Vec::new();
        let template = json!({
            "a": "{{run.id}}",
            "b": ["{{result.}}"],
            "c": "{{call.arguments.x",
            "d": "{{call.argumentsx}}",
            "ok": "{{result.id}} and {{call.arguments.n}}",
        });
        check_template(&template, "tools[0].compensate.arguments", &mut |f, m| {
            errors.push((f, m))
        });
        let fields: Vec<&str> = errors.iter().map(|(f, _)| f.as_str()).collect();
        assert_eq!(
            fields,
            [
                "tools[0].compensate.arguments.a",
                "tools[0].compensate.arguments.b[0]",
                "tools[0].compensate.arguments.c",
                "tools[0].compensate.arguments.d",
            ]
        );
    }
}
