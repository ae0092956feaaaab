//! Tool specs by domain, and calls checked against them: the tool exists,
//! required keys are present, no unknown keys, JSON types match.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::{Map, Value};

/// An id repair declared in YAML: a string argument `key` that lacks `prefix` gets it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Repair {
    /// The argument name, e.g. `order_id`.
    pub key: String,
    /// What its value must start with, e.g. `#`.
    pub prefix: String,
}

/// One tool: its parameters' JSON schema.
#[derive(Debug, Clone)]
struct Tool {
    properties: Map<String, Value>,
    required: Vec<String>,
}

/// The tools of every domain, from a file `{domain: [tool spec, ...]}`.
#[derive(Debug, Clone, Default)]
pub struct ToolSet {
    domains: Vec<(String, BTreeMap<String, Tool>)>,
}

impl ToolSet {
    /// Reads `{domain: [spec, ...]}`; a spec is `{name, parameters}` or
    /// `{type: function, function: {name, parameters}}`.
    pub fn from_json(v: &Value) -> Result<ToolSet, String> {
        let m = v
            .as_object()
            .ok_or("the tool schemas must be an object {domain: [tool, ...]}")?;
        let mut domains = Vec::new();
        for (domain, list) in m {
            let list = list
                .as_array()
                .ok_or_else(|| format!("'{domain}' is not a list of tools"))?;
            let mut tools = BTreeMap::new();
            for (i, spec) in list.iter().enumerate() {
                let spec = spec.get("function").unwrap_or(spec);
                let name = spec
                    .get("name")
                    .and_then(Value::as_str)
                    .ok_or_else(|| format!("{domain}[{i}] has no string 'name'"))?;
                let params = spec.get("parameters").cloned().unwrap_or_default();
                let properties = params
                    .get("properties")
                    .and_then(Value::as_object)
                    .cloned()
                    .unwrap_or_default();
                let required = params
                    .get("required")
                    .and_then(Value::as_array)
                    .map(|a| {
                        a.iter()
                            .filter_map(Value::as_str)
                            .map(str::to_owned)
                            .collect()
                    })
                    .unwrap_or_default();
                tools.insert(
                    name.to_owned(),
                    Tool {
                        properties,
                        required,
                    },
                );
            }
            domains.push((domain.clone(), tools));
        }
        Ok(ToolSet { domains })
    }

    /// The domain names, in file order.
    pub fn domains(&self) -> Vec<&str> {
        self.domains.iter().map(|(d, _)| d.as_str()).collect()
    }

    /// The first domain whose name the system prompt mentions (case-insensitive).
    pub fn domain_of(&self, system: &str) -> Option<usize> {
        domain_index(system, self.domains.iter().map(|(d, _)| d.as_str()))
    }

    /// Checks one call `{name, arguments}` of domain `domain` after applying
    /// `repairs`; `Ok(true)` when a repair changed it.
    pub fn check(
        &self,
        domain: usize,
        call: &mut Map<String, Value>,
        repairs: &[Repair],
    ) -> Result<bool, &'static str> {
        let tools = &self.domains[domain].1;
        let name = call.get("name").and_then(Value::as_str).unwrap_or_default();
        let tool = tools.get(name).ok_or("unknown_tool")?;
        let args = match call.get_mut("arguments") {
            Some(Value::Object(a)) => a,
            None => return check_args(tool, &Map::new()).map(|_| false),
            Some(_) => return Err("arguments_not_an_object"),
        };
        let mut repaired = false;
        for r in repairs {
            if let Some(Value::String(s)) = args.get_mut(&r.key)
                && !s.starts_with(&r.prefix)
            {
                s.insert_str(0, &r.prefix);
                repaired = true;
            }
        }
        check_args(tool, args)?;
        Ok(repaired)
    }
}

/// The index of the first of `domains` that `system` mentions (case-insensitive).
pub fn domain_index<'a>(system: &str, domains: impl Iterator<Item = &'a str>) -> Option<usize> {
    let s = system.to_lowercase();
    domains
        .enumerate()
        .find(|(_, d)| s.contains(&d.to_lowercase()))
        .map(|(i, _)| i)
}

fn check_args(tool: &Tool, args: &Map<String, Value>) -> Result<(), &'static str> {
    if tool.required.iter().any(|k| !args.contains_key(k)) {
        return Err("missing_required_argument");
    }
    for (k, v) in args {
        let schema = tool.properties.get(k).ok_or("unknown_argument")?;
        if !type_ok(schema, v) {
            return Err("wrong_argument_type");
        }
    }
    Ok(())
}

/// Whether `v` has the JSON type `schema` asks for (`type` a name or a list
/// of names; array items and object properties checked when given).
fn type_ok(schema: &Value, v: &Value) -> bool {
    let types: Vec<&str> = match schema.get("type") {
        Some(Value::String(t)) => vec![t.as_str()],
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).collect(),
        _ => return true,
    };
    types.iter().any(|t| match *t {
        "string" => v.is_string(),
        "number" => v.is_number(),
        "integer" => v.is_i64() || v.is_u64(),
        "boolean" => v.is_boolean(),
        "null" => v.is_null(),
        "array" => v.as_array().is_some_and(|a| match schema.get("items") {
            Some(items) => a.iter().all(|x| type_ok(items, x)),
            None => true,
        }),
        "object" => v.as_object().is_some_and(|o| {
            let props = schema.get("properties").and_then(Value::as_object);
            o.iter().all(|(k, x)| match props.and_then(|p| p.get(k)) {
                Some(s) => type_ok(s, x),
                None => true,
            })
        }),
        _ => true,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn set() -> ToolSet {
        ToolSet::from_json(&json!({
            "airline": [{"name": "cancel_reservation", "parameters": {"type": "object",
                "properties": {"reservation_id": {"type": "string"}}, "required": ["reservation_id"]}}],
            "retail": [{"type": "function", "function": {"name": "return_items", "parameters": {"type": "object",
                "properties": {
                    "order_id": {"type": "string"},
                    "item_ids": {"type": "array", "items": {"type": "string"}},
                    "count": {"type": "integer"},
                    "price": {"type": "number"},
                    "gift": {"type": "boolean"},
                    "address": {"type": "object", "properties": {"zip": {"type": "string"}}},
                    "note": {"type": ["string", "null"]}
                },
                "required": ["order_id", "item_ids"]}}}]
        }))
        .unwrap()
    }

    fn check(call: Value, repairs: &[Repair]) -> Result<(bool, Value), &'static str> {
        let set = set();
        let d = set.domain_of("You are a RETAIL agent.").unwrap();
        let mut m = call.as_object().unwrap().clone();
        set.check(d, &mut m, repairs).map(|r| (r, Value::Object(m)))
    }

    #[test]
    fn domains_by_keyword() {
        let s = set();
        assert_eq!(s.domains(), ["airline", "retail"]);
        assert_eq!(s.domain_of("# Airline Agent Policy"), Some(0));
        assert_eq!(s.domain_of("telecom"), None);
    }

    #[test]
    fn calls_against_schemas() {
        let good = json!({"name": "return_items", "arguments": {"order_id": "#W1", "item_ids": ["1"],
            "count": 2, "price": 2.5, "gift": false, "address": {"zip": "10001"}, "note": null}});
        assert!(!check(good, &[]).unwrap().0);
        let bad = |args: Value| check(json!({"name": "return_items", "arguments": args}), &[]);
        assert_eq!(
            bad(json!({"order_id": "#W1"})),
            Err("missing_required_argument")
        );
        assert_eq!(
            bad(json!({"order_id": "#W1", "item_ids": [], "colour": "red"})),
            Err("unknown_argument")
        );
        for wrong in [
            json!({"order_id": 7, "item_ids": []}),
            json!({"order_id": "#W1", "item_ids": [1]}),
            json!({"order_id": "#W1", "item_ids": [], "count": "2"}),
            json!({"order_id": "#W1", "item_ids": [], "count": 2.5}),
            json!({"order_id": "#W1", "item_ids": [], "price": "2.5"}),
            json!({"order_id": "#W1", "item_ids": [], "gift": "yes"}),
            json!({"order_id": "#W1", "item_ids": [], "address": {"zip": 10001}}),
            json!({"order_id": "#W1", "item_ids": "1"}),
        ] {
            assert_eq!(bad(wrong.clone()), Err("wrong_argument_type"), "{wrong}");
        }
        assert_eq!(
            check(json!({"name": "nope", "arguments": {}}), &[]),
            Err("unknown_tool")
        );
        assert_eq!(
            check(json!({"name": "return_items", "arguments": "x"}), &[]),
            Err("arguments_not_an_object")
        );
    }

    #[test]
    fn id_prefix_repairs() {
        let r = [Repair {
            key: "order_id".into(),
            prefix: "#".into(),
        }];
        let (fixed, call) = check(
            json!({"name": "return_items", "arguments": {"order_id": "W2378156", "item_ids": []}}),
            &r,
        )
        .unwrap();
        assert!(fixed);
        assert_eq!(call["arguments"]["order_id"], "#W2378156");
        let (fixed, _) = check(
            json!({"name": "return_items", "arguments": {"order_id": "#W2378156", "item_ids": []}}),
            &r,
        )
        .unwrap();
        assert!(!fixed);
    }
}
