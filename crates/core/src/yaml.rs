//! YAML (or JSON) text to a JSON value, with the size of the value bounded
//! by the size of the text.
//!
//! A YAML alias repeats the node its anchor names, so a few hundred bytes of
//! aliases of aliases ("billion laughs") can stand for gigabytes. The parser
//! caps the repetitions by the number of events in the document, which a
//! long padding raises as far as the body limit allows; so the value is
//! built here, charging every node and every byte of text against a budget
//! proportional to the text, and building stops at the first node over it.
//! A document without aliases always fits: each node and each byte of a
//! string comes from at least one byte of the text.

use std::cell::Cell;
use std::fmt;

use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};

/// Budget units (nodes + string bytes) per byte of text, and in addition.
const PER_BYTE: usize = 2;
const SLACK: usize = 1024;

/// Parses YAML or JSON text into a JSON value; the error says where the
/// text is wrong, or that its aliases expand too far.
pub fn parse(text: &str) -> Result<Value, String> {
    let budget = Cell::new(text.len().saturating_mul(PER_BYTE).saturating_add(SLACK));
    Bounded(&budget)
        .deserialize(serde_yaml_ng::Deserializer::from_str(text))
        .map_err(|e| e.to_string())
}

/// Builds a [`Value`], charging the budget.
#[derive(Clone, Copy)]
struct Bounded<'a>(&'a Cell<usize>);

impl Bounded<'_> {
    fn charge<E: serde::de::Error>(self, units: usize) -> Result<(), E> {
        let left = self.0.get().checked_sub(units.saturating_add(1));
        match left {
            Some(left) => {
                self.0.set(left);
                Ok(())
            }
            None => Err(E::custom(
                "the document expands to much more than its text (YAML aliases repeating too much)",
            )),
        }
    }
}

impl<'de> DeserializeSeed<'de> for Bounded<'_> {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Bounded<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a YAML or JSON value")
    }

    fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<Value, E> {
        self.charge(0)?;
        Ok(Value::Bool(v))
    }

    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Value, E> {
        self.charge(0)?;
        Ok(Value::Number(v.into()))
    }

    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Value, E> {
        self.charge(0)?;
        Ok(Value::Number(v.into()))
    }

    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Value, E> {
        self.charge(0)?;
        // JSON has no NaN or infinity: refused, rather than read as null.
        Number::from_f64(v)
            .map(Value::Number)
            .ok_or_else(|| E::custom(format!("`{v}` is not a number JSON can hold")))
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Value, E> {
        self.charge(v.len())?;
        Ok(Value::String(v.to_string()))
    }

    fn visit_string<E: serde::de::Error>(self, v: String) -> Result<Value, E> {
        self.charge(v.len())?;
        Ok(Value::String(v))
    }

    fn visit_unit<E: serde::de::Error>(self) -> Result<Value, E> {
        self.charge(0)?;
        Ok(Value::Null)
    }

    fn visit_none<E: serde::de::Error>(self) -> Result<Value, E> {
        self.visit_unit()
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        self.deserialize(deserializer)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        self.charge(0)?;
        let mut items = Vec::new();
        while let Some(item) = seq.next_element_seed(self)? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        self.charge(0)?;
        let mut object = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            self.charge(key.len())?;
            let value = map.next_value_seed(self)?;
            object.insert(key, value);
        }
        Ok(Value::Object(object))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_parse_as_before() {
        let text = "a: 1\nb: [x, 2.5, true, null]\nc: {d: \"e\"}\nf: &f [1, 2]\ng: *f\n";
        let value = parse(text).expect("parse");
        let before: Value = serde_yaml_ng::from_str(text).expect("parse");
        assert_eq!(value, before);
        assert_eq!(value["g"], serde_json::json!([1, 2]));
        // Long flat documents fit their budget.
        let flat = format!("[{}]", vec!["0"; 100_000].join(","));
        assert_eq!(
            parse(&flat).map(|v| v.as_array().map(Vec::len)),
            Ok(Some(100_000))
        );
        let text = format!("{{a: \"{}\"}}", "x".repeat(100_000));
        assert!(parse(&text).is_ok());
    }

    #[test]
    fn alias_bombs_stop_early() {
        // Nine levels of nine aliases: 9^9 strings from ~200 bytes.
        let mut laughs = String::from("a: &a [lol,lol,lol,lol,lol,lol,lol,lol,lol]\n");
        for (name, previous) in ["b", "c", "d", "e", "f", "g", "h", "i"]
            .iter()
            .zip(["a", "b", "c", "d", "e", "f", "g", "h"])
        {
            let refs = vec![format!("*{previous}"); 9].join(",");
            laughs.push_str(&format!("{name}: &{name} [{refs}]\n"));
        }
        // Padding raises the parser's own limit (repetitions per event).
        let padded = format!("pad: [{}]\n{laughs}", vec!["0"; 20_000].join(","));
        let long = format!(
            "a: &a \"{}\"\nb: [*a,*a,*a,*a,*a,*a,*a,*a,*a,*a]\nc: [*b,*b,*b,*b,*b,*b,*b,*b,*b,*b]\n",
            "x".repeat(10_000)
        );
        for text in [laughs, padded, long] {
            let error = parse(&text).expect_err("a bomb");
            assert!(
                error.contains("repeating") || error.contains("repetition limit"),
                "{error}"
            );
        }
    }

    #[test]
    fn numbers_json_cannot_hold_are_refused() {
        for text in ["a: .nan", "a: .inf", "a: -.inf"] {
            let error = parse(text).expect_err(text);
            assert!(
                error.contains("not a number JSON can hold"),
                "{text}: {error}"
            );
        }
        assert!(parse(&"[".repeat(1000)).is_err());
    }
}
