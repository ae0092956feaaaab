//! `finetuning_type: freeze`: which weights train, by LLaMA-Factory's rule.
//!
//! The last `freeze_trainable_layers` decoder layers (the first ones when it
//! is negative) train, all of each (`all`) or only the named sub-modules
//! (`self_attn`, `mlp`, `input_layernorm`, `post_attention_layernorm`, and
//! Gemma's `pre_feedforward_layernorm`, `post_feedforward_layernorm`), plus
//! the `freeze_extra_modules` outside the layers (`embed_tokens`, `norm`,
//! `lm_head`). As in LLaMA-Factory, a weight trains when its Hugging Face
//! name contains `.{layer}.{module}` or an extra module's name, so `norm`
//! also matches the layers' norms.

use serde_json::Value;

/// Sub-modules of a decoder layer, as LLaMA-Factory lists them for Llama and
/// Qwen2, and Gemma's two more norms.
pub const LAYER_MODULES: &[&str] = &[
    "self_attn",
    "mlp",
    "input_layernorm",
    "post_attention_layernorm",
    "pre_feedforward_layernorm",
    "post_feedforward_layernorm",
];

/// Modules outside the decoder layers.
pub const EXTRA_MODULES: &[&str] = &["embed_tokens", "norm", "lm_head"];

/// The module names in a comma-separated string (empty entries left out) or
/// a list of strings; none when unset.
pub fn names(v: &Value) -> Result<Vec<String>, String> {
    if v.is_null() {
        return Ok(Vec::new());
    }
    let mut names = crate::params::name_list(v)?;
    if v.is_string() {
        names.retain(|x| !x.is_empty());
    }
    Ok(names)
}

/// Checks `modules` (the trainable sub-modules of a layer, or `all`) and
/// `extra` against the known names; the error is the param's name and a
/// message naming the culprit and the choices.
pub fn check(modules: &[String], extra: &[String]) -> Result<(), (&'static str, String)> {
    let layer_choices = format!("`all` or some of {}", LAYER_MODULES.join(", "));
    if modules.is_empty() {
        return Err((
            "freeze_trainable_modules",
            format!("freeze_trainable_modules is empty: use {layer_choices}"),
        ));
    }
    for m in modules {
        if m != "all" && !LAYER_MODULES.contains(&m.as_str()) {
            return Err((
                "freeze_trainable_modules",
                format!("'{m}' is not a module of a decoder layer; use {layer_choices}"),
            ));
        }
    }
    for m in extra {
        if !EXTRA_MODULES.contains(&m.as_str()) {
            return Err((
                "freeze_extra_modules",
                format!(
                    "'{m}' is not a module outside the layers; use some of {}",
                    EXTRA_MODULES.join(", ")
                ),
            ));
        }
    }
    Ok(())
}

/// The substrings that make a weight trainable in a model of `num_layers`
/// decoder layers.
pub fn patterns(
    layers: i64,
    num_layers: usize,
    modules: &[String],
    extra: &[String],
) -> Vec<String> {
    let n = num_layers as i64;
    let ids = if layers > 0 {
        (n - layers).max(0)..n
    } else {
        0..(-layers).min(n)
    };
    let mut out = Vec::new();
    for m in modules {
        for i in ids.clone() {
            out.push(if m == "all" {
                format!(".{i}.")
            } else {
                format!(".{i}.{m}")
            });
        }
    }
    out.extend(extra.iter().cloned());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn patterns_follow_llamafactory() {
        assert_eq!(patterns(2, 24, &s(&["all"]), &[]), [".22.", ".23."]);
        assert_eq!(
            patterns(-1, 24, &s(&["mlp"]), &s(&["norm"])),
            [".0.mlp", "norm"]
        );
        assert_eq!(patterns(5, 2, &s(&["all"]), &[]), [".0.", ".1."]);
        let p = patterns(1, 12, &s(&["all"]), &[]);
        let trains = |name: &str| p.iter().any(|x| name.contains(x.as_str()));
        assert!(trains("model.layers.11.mlp.up_proj.weight"));
        assert!(!trains("model.layers.1.mlp.up_proj.weight"));
        assert_eq!(
            names(&json!("mlp, self_attn")).unwrap(),
            s(&["mlp", "self_attn"])
        );
        let e = check(&s(&["attn"]), &[]).unwrap_err();
        assert_eq!(e.0, "freeze_trainable_modules");
        assert!(e.1.contains("'attn'"), "{e:?}");
        let e = check(&s(&["all"]), &s(&["head"])).unwrap_err();
        assert_eq!(e.0, "freeze_extra_modules");
        assert!(e.1.contains("lm_head"), "{e:?}");
        assert_eq!(check(&[], &[]).unwrap_err().0, "freeze_trainable_modules");
    }
}
