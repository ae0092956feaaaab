//! Typed params for stage kinds, with errors that name the key and suggest a fix.

use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::ConfigError;

/// Deserializes a stage's `params` into `T` (which should use `deny_unknown_fields`).
pub fn parse<T: DeserializeOwned>(params: &Value) -> Result<T, ConfigError> {
    let v = if params.is_null() {
        Value::Object(Default::default())
    } else {
        params.clone()
    };
    serde_path_to_error::deserialize(v).map_err(|e| {
        let path = e.path().to_string();
        let mut err = to_config_error(&e.inner().to_string());
        // A wrong value names its key (`params.val_ratio`, `params.steps[1].x`).
        if err.key == "params" && path != "." && !path.is_empty() {
            err.key = format!("params.{path}");
            err.message = format!("{path}: {}", err.message);
        }
        err
    })
}

/// Params that check their values beyond what their types say.
pub trait Validate {
    /// The first value out of range, if any.
    fn validate(&self) -> Result<(), ConfigError> {
        Ok(())
    }
}

/// The names in a param given as a comma-separated string (`q_proj, v_proj`)
/// or a list of strings, as LLaMA-Factory takes `lora_target` and the
/// `freeze_*` modules; the error completes "`<key>` ...".
pub fn name_list(v: &Value) -> Result<Vec<String>, String> {
    match v {
        Value::String(s) => Ok(s.split(',').map(|x| x.trim().to_owned()).collect()),
        Value::Array(a) => a
            .iter()
            .map(|x| {
                x.as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| "entries must be strings".to_owned())
            })
            .collect(),
        _ => Err("must be a string or a list of strings".into()),
    }
}

/// For [`crate::Stage::check`]: every problem with `params`.
pub fn check<T: DeserializeOwned + Validate>(params: &Value) -> Vec<ConfigError> {
    match parse::<T>(params) {
        Err(e) => vec![e],
        Ok(p) => p.validate().err().into_iter().collect(),
    }
}

/// For [`crate::Stage::run`]: the params, or an error naming the key.
pub fn for_run<T: DeserializeOwned + Validate>(params: &Value) -> anyhow::Result<T> {
    let p = parse::<T>(params).map_err(|e| anyhow::anyhow!("{}: {}", e.key, e.message))?;
    p.validate()
        .map_err(|e| anyhow::anyhow!("{}: {}", e.key, e.message))?;
    Ok(p)
}

/// Turns serde's message into a `ConfigError` on the right key.
fn to_config_error(msg: &str) -> ConfigError {
    // "unknown field `mod`, expected one of `mode`, `seed`"
    if let Some(rest) = msg.strip_prefix("unknown field `")
        && let Some((field, tail)) = rest.split_once('`')
    {
        let expected: Vec<&str> = tail.split('`').skip(1).step_by(2).collect();
        let best = expected
            .iter()
            .map(|c| (strsim::jaro_winkler(field, c), *c))
            .filter(|(s, _)| *s > 0.8)
            .max_by(|a, b| a.0.total_cmp(&b.0));
        let message = match best {
            Some((_, c)) => format!("unknown param '{field}'; did you mean '{c}'?"),
            None => format!(
                "unknown param '{field}'; expected one of: {}",
                expected.join(", ")
            ),
        };
        return ConfigError {
            key: format!("params.{field}"),
            message,
        };
    }
    // "missing field `mode`"
    if let Some(rest) = msg.strip_prefix("missing field `")
        && let Some((field, _)) = rest.split_once('`')
    {
        return ConfigError {
            key: "params".into(),
            message: format!("missing param '{field}'"),
        };
    }
    ConfigError {
        key: "params".into(),
        message: msg.to_owned(),
    }
}

/// What to do with a malformed input record.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnError {
    /// Stop with an error naming the file and line.
    #[default]
    Fail,
    /// Skip it and count it in the stage report.
    Skip,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct P {
        mode: String,
        #[serde(default)]
        seed: u64,
    }

    #[test]
    fn type_errors_name_the_param() {
        let e = parse::<P>(&serde_json::json!({"mode": "x", "seed": "3"})).unwrap_err();
        assert_eq!(e.key, "params.seed");
        assert!(
            e.message.starts_with("seed: invalid type: string"),
            "{}",
            e.message
        );
    }

    #[test]
    fn errors_name_the_param() {
        let e = parse::<P>(&serde_json::json!({"mod": "x"})).unwrap_err();
        assert_eq!(e.key, "params.mod");
        assert_eq!(e.message, "unknown param 'mod'; did you mean 'mode'?");
        let e = parse::<P>(&serde_json::json!({})).unwrap_err();
        assert_eq!(e.message, "missing param 'mode'");
        let e = parse::<P>(&serde_json::json!({"mode": 3})).unwrap_err();
        assert!(e.message.contains("invalid type"), "{}", e.message);
    }
}
