//! Approval policies of a spec: which tool calls wait for a human
//! (`requires_approval` on a tool, `approvals.tools` patterns on the agent),
//! a small condition language on the call's arguments, what happens when
//! nobody decides in time, and what recovery does with a call that may or
//! may not have happened (`on_uncertain`).
//!
//! Conditions are data, never code: a JSON pointer into the arguments and one
//! comparison (`eq`, `ne`, `gt`, `gte`, `lt`, `lte`, `in`, `exists`), or
//! `any` / `all` of other conditions.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::spec::human_duration;

/// Deepest nesting of `any` / `all` a condition may have.
const MAX_DEPTH: usize = 8;

/// A test on a tool call's arguments.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Condition {
    /// JSON pointer into the arguments (`/amount`, `/to/0`; `""` is the whole value).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// The value there equals this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eq: Option<Value>,
    /// The value there is missing or differs from this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ne: Option<Value>,
    /// The value there is a number greater than this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gt: Option<f64>,
    /// The value there is a number at least this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gte: Option<f64>,
    /// The value there is a number less than this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lt: Option<f64>,
    /// The value there is a number at most this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lte: Option<f64>,
    /// The value there is one of these.
    #[serde(default, rename = "in", skip_serializing_if = "Option::is_none")]
    pub one_of: Option<Vec<Value>>,
    /// The value there exists (`true`) or not (`false`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exists: Option<bool>,
    /// Any of these conditions holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub any: Option<Vec<Condition>>,
    /// All of these conditions hold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub all: Option<Vec<Condition>>,
}

impl Condition {
    /// Whether the condition holds for `arguments`. A path that is missing
    /// makes every comparison false but `ne` and `exists: false`.
    pub fn matches(&self, arguments: &Value) -> bool {
        if let Some(any) = &self.any {
            return any.iter().any(|c| c.matches(arguments));
        }
        if let Some(all) = &self.all {
            return all.iter().all(|c| c.matches(arguments));
        }
        let found = self.path.as_deref().and_then(|p| arguments.pointer(p));
        let number = found.and_then(Value::as_f64);
        if let Some(want) = &self.eq {
            return found == Some(want);
        }
        if let Some(want) = &self.ne {
            return found != Some(want);
        }
        if let Some(bound) = self.gt {
            return number.is_some_and(|n| n > bound);
        }
        if let Some(bound) = self.gte {
            return number.is_some_and(|n| n >= bound);
        }
        if let Some(bound) = self.lt {
            return number.is_some_and(|n| n < bound);
        }
        if let Some(bound) = self.lte {
            return number.is_some_and(|n| n <= bound);
        }
        if let Some(values) = &self.one_of {
            return found.is_some_and(|v| values.contains(v));
        }
        if let Some(exists) = self.exists {
            return found.is_some() == exists;
        }
        false
    }

    /// Checks the shape: a path with exactly one comparison, or `any` /
    /// `all` alone with at least one condition each.
    pub(crate) fn check(&self, at: &str, err: &mut impl FnMut(String, String)) {
        self.check_at(at, 0, err);
    }

    fn check_at(&self, at: &str, depth: usize, err: &mut impl FnMut(String, String)) {
        if depth > MAX_DEPTH {
            err(
                at.to_string(),
                format!("conditions nest at most {MAX_DEPTH} deep"),
            );
            return;
        }
        let comparisons = [
            self.eq.is_some(),
            self.ne.is_some(),
            self.gt.is_some(),
            self.gte.is_some(),
            self.lt.is_some(),
            self.lte.is_some(),
            self.one_of.is_some(),
            self.exists.is_some(),
        ]
        .iter()
        .filter(|set| **set)
        .count();
        let groups = [(&self.any, "any"), (&self.all, "all")];
        let grouped = groups.iter().filter(|(g, _)| g.is_some()).count();
        if grouped > 0 {
            if grouped > 1 || comparisons > 0 || self.path.is_some() {
                err(
                    at.to_string(),
                    "write either `any`, `all`, or a `path` with one comparison".into(),
                );
                return;
            }
            for (group, name) in groups {
                let Some(list) = group else { continue };
                if list.is_empty() {
                    err(
                        format!("{at}.{name}"),
                        "needs at least one condition".into(),
                    );
                }
                for (i, c) in list.iter().enumerate() {
                    c.check_at(&format!("{at}.{name}[{i}]"), depth + 1, err);
                }
            }
            return;
        }
        match &self.path {
            None => err(
                format!("{at}.path"),
                "a condition needs a `path` (a JSON pointer such as /amount), or `any` / `all`"
                    .into(),
            ),
            Some(path) if !(path.is_empty() || path.starts_with('/')) => err(
                format!("{at}.path"),
                format!("`{path}` is not a JSON pointer (write /{path})"),
            ),
            Some(_) => {}
        }
        if comparisons != 1 {
            err(
                at.to_string(),
                "needs exactly one of eq, ne, gt, gte, lt, lte, in, exists".into(),
            );
        }
        for (bound, name) in [
            (self.gt, "gt"),
            (self.gte, "gte"),
            (self.lt, "lt"),
            (self.lte, "lte"),
        ] {
            if bound.is_some_and(|b| !b.is_finite()) {
                err(format!("{at}.{name}"), "must be a finite number".into());
            }
        }
    }
}

/// A tool's `requires_approval`: `false` (the default), `true`, or
/// `{when: <condition>}`.
#[derive(Clone, Debug, Default, PartialEq)]
pub enum RequiresApproval {
    /// Calls run without asking.
    #[default]
    Never,
    /// Every call waits for a decision.
    Always,
    /// Calls whose arguments match wait for a decision.
    When(Box<Condition>),
}

impl RequiresApproval {
    /// Whether nothing is asked (then the field is not written).
    pub fn is_never(&self) -> bool {
        *self == RequiresApproval::Never
    }

    /// Whether a call with these arguments waits for a decision.
    pub fn applies(&self, arguments: &Value) -> bool {
        match self {
            RequiresApproval::Never => false,
            RequiresApproval::Always => true,
            RequiresApproval::When(c) => c.matches(arguments),
        }
    }
}

/// The `{when: ...}` form of [`RequiresApproval`].
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct WhenForm {
    when: Condition,
}

impl Serialize for RequiresApproval {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            RequiresApproval::Never => s.serialize_bool(false),
            RequiresApproval::Always => s.serialize_bool(true),
            RequiresApproval::When(c) => WhenForm {
                when: c.as_ref().clone(),
            }
            .serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for RequiresApproval {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match Value::deserialize(d)? {
            Value::Bool(false) => Ok(RequiresApproval::Never),
            Value::Bool(true) => Ok(RequiresApproval::Always),
            value @ Value::Object(_) => serde_json::from_value::<WhenForm>(value)
                .map(|w| RequiresApproval::When(Box::new(w.when)))
                .map_err(serde::de::Error::custom),
            other => Err(serde::de::Error::custom(format!(
                "expected true, false or {{when: <condition>}}, found {other}"
            ))),
        }
    }
}

/// One entry of `approvals.tools`: a tool-name pattern (`*` matches any
/// run of characters), optionally with a condition on the arguments.
/// Written as a string (`"delete_*"`) or `{tool: "transfer*", when: ...}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// Tool-name pattern.
    pub tool: String,
    /// Only calls whose arguments match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub when: Option<Condition>,
}

impl Rule {
    /// Whether a call of `tool` with these arguments falls under the rule.
    pub fn applies(&self, tool: &str, arguments: &Value) -> bool {
        glob(&self.tool, tool) && self.when.as_ref().is_none_or(|c| c.matches(arguments))
    }
}

/// Reads a rule in either form.
pub(crate) fn rules<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<Rule>, D::Error> {
    let values = Vec::<Value>::deserialize(d)?;
    let mut rules = Vec::with_capacity(values.len());
    for (i, value) in values.into_iter().enumerate() {
        let rule = match value {
            Value::String(tool) => Rule { tool, when: None },
            value @ Value::Object(_) => serde_json::from_value::<Rule>(value)
                .map_err(|e| serde::de::Error::custom(format!("[{i}]: {e}")))?,
            other => {
                return Err(serde::de::Error::custom(format!(
                    "[{i}]: expected a tool-name pattern or {{tool: <pattern>, when: <condition>}}, found {other}"
                )));
            }
        };
        rules.push(rule);
    }
    Ok(rules)
}

/// Whether `name` matches `pattern`, where `*` matches any run of
/// characters (none included) and everything else matches itself.
pub fn glob(pattern: &str, name: &str) -> bool {
    let (p, n) = (pattern.as_bytes(), name.as_bytes());
    let (mut pi, mut ni) = (0, 0);
    // Where the last `*` was, and where in the name it started matching.
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ni));
            pi += 1;
        } else if pi < p.len() && p[pi] == n[ni] {
            pi += 1;
            ni += 1;
        } else if let Some((sp, sn)) = star {
            pi = sp + 1;
            ni = sn + 1;
            star = Some((sp, sn + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == b'*')
}

/// What happens when nobody decides within `approvals.timeout`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnTimeout {
    /// The call is rejected (by `keel:timeout`); the model is told.
    #[default]
    Reject,
    /// The approval is marked escalated, `approvals.escalate_to` (or
    /// `notify`) is told again, and the run keeps waiting (up to its
    /// `limits.timeout`).
    Escalate,
}

/// What recovery does with a call whose `ToolCallStarted` has no result
/// (the worker making it died, or the connection to its MCP server was cut
/// mid-call): it may or may not have happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnUncertain {
    /// Make it again with the same idempotency key (the default for tools
    /// declared `idempotent: true` and for the read-only built-ins).
    Retry,
    /// Fail the run (`uncertain_tool_call`): someone has to find out what happened.
    Fail,
    /// Park the run for a human: approving repeats the call with the same
    /// key, rejecting tells the model it failed (the default otherwise).
    Ask,
}

impl OnUncertain {
    /// The policy's name in a spec.
    pub fn as_str(self) -> &'static str {
        match self {
            OnUncertain::Retry => "retry",
            OnUncertain::Fail => "fail",
            OnUncertain::Ask => "ask",
        }
    }
}

/// `approvals:` section of a spec.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Approvals {
    /// Tools (by name pattern, optionally with a condition) whose calls wait
    /// for a decision, besides those marked `requires_approval` (covers
    /// tools that are not declared inline).
    #[serde(
        default,
        deserialize_with = "rules",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub tools: Vec<Rule>,
    /// How long a decision may take before `on_timeout` applies (none: the
    /// run waits up to its `limits.timeout`).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "human_duration::option"
    )]
    pub timeout: Option<Duration>,
    /// What a timeout does.
    #[serde(default, skip_serializing_if = "is_reject")]
    pub on_timeout: OnTimeout,
    /// URL POSTed to when a run starts waiting for a decision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notify: Option<String>,
    /// URL POSTed to when an approval is escalated (`notify` when unset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub escalate_to: Option<String>,
}

fn is_reject(policy: &OnTimeout) -> bool {
    *policy == OnTimeout::Reject
}

impl Approvals {
    /// Whether nothing is set (then the section is not written).
    pub fn is_empty(&self) -> bool {
        *self == Approvals::default()
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn condition(value: Value) -> Condition {
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn conditions_compare_what_the_pointer_finds() {
        let args = json!({"amount": 150, "to": ["a@x"], "currency": "EUR", "flag": null});
        let holds = |c: Value| condition(c).matches(&args);
        assert!(holds(json!({"path": "/amount", "gt": 100})));
        assert!(!holds(json!({"path": "/amount", "gt": 150})));
        assert!(holds(json!({"path": "/amount", "gte": 150})));
        assert!(holds(json!({"path": "/amount", "lt": 150.5})));
        assert!(
            !holds(json!({"path": "/currency", "lt": 1})),
            "not a number"
        );
        assert!(holds(json!({"path": "/currency", "eq": "EUR"})));
        assert!(holds(json!({"path": "/currency", "in": ["USD", "EUR"]})));
        assert!(holds(json!({"path": "/to/0", "eq": "a@x"})));
        assert!(holds(json!({"path": "/missing", "ne": 1})));
        assert!(!holds(json!({"path": "/missing", "gt": 0})));
        assert!(holds(json!({"path": "/missing", "exists": false})));
        assert!(holds(json!({"path": "/flag", "exists": true})));
        assert!(holds(json!({"any": [
            {"path": "/amount", "gt": 1000},
            {"path": "/currency", "ne": "USD"}
        ]})));
        assert!(!holds(json!({"all": [
            {"path": "/amount", "gt": 100},
            {"path": "/currency", "eq": "USD"}
        ]})));
    }

    #[test]
    fn malformed_conditions_name_the_field() {
        let problems = |c: Value| {
            let mut out = Vec::new();
            condition(c).check("c", &mut |field, message| out.push((field, message)));
            out.into_iter().map(|(f, _)| f).collect::<Vec<_>>()
        };
        assert!(problems(json!({"path": "/a", "eq": 1})).is_empty());
        assert_eq!(problems(json!({"eq": 1})), vec!["c.path"]);
        assert_eq!(problems(json!({"path": "a", "eq": 1})), vec!["c.path"]);
        assert_eq!(problems(json!({"path": "/a"})), vec!["c"]);
        assert_eq!(problems(json!({"path": "/a", "eq": 1, "gt": 2})), vec!["c"]);
        assert_eq!(problems(json!({"any": []})), vec!["c.any"]);
        assert_eq!(problems(json!({"all": [{"path": "/a"}]})), vec!["c.all[0]"]);
        assert_eq!(
            problems(json!({"any": [{"path": "/a", "eq": 1}], "path": "/b"})),
            vec!["c"]
        );
    }

    #[test]
    fn globs_match_tool_names() {
        assert!(glob("delete_*", "delete_user"));
        assert!(glob("delete_*", "delete_"));
        assert!(!glob("delete_*", "undelete_user"));
        assert!(glob("*", "anything"));
        assert!(glob("*_admin_*", "github_admin_merge"));
        assert!(glob("a*b*c", "aXbYbZc"));
        assert!(!glob("a*b*c", "aXbYbZ"));
        assert!(glob("exact", "exact"));
        assert!(!glob("exact", "exactly"));
    }

    #[test]
    fn requires_approval_reads_a_flag_or_a_condition() {
        let read = |v: Value| serde_json::from_value::<RequiresApproval>(v);
        assert_eq!(read(json!(true)).unwrap(), RequiresApproval::Always);
        assert_eq!(read(json!(false)).unwrap(), RequiresApproval::Never);
        let when = read(json!({"when": {"path": "/n", "gt": 1}})).unwrap();
        assert!(when.applies(&json!({"n": 2})));
        assert!(!when.applies(&json!({"n": 1})));
        assert!(read(json!("yes")).is_err());
        assert!(read(json!({"if": {}})).is_err());
        // It round-trips (stored specs compare equal).
        let back = serde_json::to_value(&when).unwrap();
        assert_eq!(read(back).unwrap(), when);
    }
}
