//! Every learning-rate schedule against transformers' `get_scheduler`, step by
//! step, with and without warmup and with each schedule's kwargs.
//!
//! Needs `python3` with torch and transformers
//! (`python3 -m pip install torch transformers`).

mod common;

use anneal_stages::train::{Schedule, Scheduler};
use serde_json::json;

/// Prints, for each case `[name, kwargs, warmup, total, peak]`, the learning
/// rate of every step as `LambdaLR` sets it before each optimizer step, as the
/// bits of the f64 (a decimal would be rounded again when parsed).
const HF: &str = r#"
import json, struct, sys, warnings
import torch
from transformers import get_scheduler
warnings.simplefilter("ignore")
out = []
for name, kwargs, warmup, total, peak in json.loads(sys.argv[1]):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    s = get_scheduler(name, opt, num_warmup_steps=warmup, num_training_steps=total,
                      scheduler_specific_kwargs=kwargs)
    lrs = []
    for _ in range(total):
        lrs.append(struct.unpack("<Q", struct.pack("<d", opt.param_groups[0]["lr"]))[0])
        opt.step()
        s.step()
    out.append(lrs)
print(json.dumps(out))
"#;

#[test]
fn every_schedule_matches_transformers() {
    let cases = json!([
        ["linear", {}, 3, 17, 2e-5],
        ["linear", {}, 0, 5, 1e-3],
        ["cosine", {}, 4, 23, 1e-5],
        ["cosine", {"num_cycles": 1.25}, 2, 19, 1e-4],
        ["constant", {}, 3, 6, 5e-6],
        ["constant_with_warmup", {}, 5, 12, 5e-6],
        ["cosine_with_restarts", {}, 2, 15, 1e-4],
        ["cosine_with_restarts", {"num_cycles": 3}, 2, 31, 1e-4],
        ["polynomial", {}, 3, 14, 1e-3],
        ["polynomial", {"lr_end": 1e-5, "power": 2.5}, 0, 14, 1e-3],
        ["inverse_sqrt", {}, 4, 20, 1e-3],
        ["inverse_sqrt", {"timescale": 7}, 2, 20, 1e-3],
        ["inverse_sqrt", {}, 0, 5, 1e-3],
        ["cosine_with_min_lr", {"min_lr_rate": 0.1}, 3, 21, 2e-5],
        ["cosine_with_min_lr", {"min_lr": 1e-6, "num_cycles": 0.75}, 0, 13, 2e-5],
        ["cosine_warmup_with_min_lr", {"min_lr_rate": 0.05}, 4, 18, 1e-4],
        ["cosine_warmup_with_min_lr", {"min_lr": 1e-5, "warmup_lr_rate": 0.2}, 5, 18, 1e-4],
        ["warmup_stable_decay", {"num_decay_steps": 6}, 3, 20, 1e-4],
        ["warmup_stable_decay", {"num_decay_steps": 5, "num_stable_steps": 4,
            "warmup_type": "cosine", "decay_type": "1-sqrt", "min_lr_ratio": 0.1}, 4, 20, 1e-4],
        ["warmup_stable_decay", {"num_decay_steps": 7, "warmup_type": "1-sqrt",
            "decay_type": "linear", "num_cycles": 0.3}, 2, 16, 1e-4]
    ]);
    let cases_arg = cases.to_string();
    let out = common::python_json(HF, &[cases_arg.as_ref()], "torch transformers");
    let hf: Vec<Vec<u64>> = serde_json::from_value(out).expect("lists of f64 bits");
    for (case, want) in cases.as_array().unwrap().iter().zip(&hf) {
        let kind: Scheduler = serde_json::from_value(case[0].clone()).unwrap();
        let (warmup, total, peak) = (
            case[2].as_u64().unwrap(),
            case[3].as_u64().unwrap(),
            case[4].as_f64().unwrap(),
        );
        let s = Schedule::new(kind, case[1].as_object().unwrap(), peak)
            .and_then(|s| s.for_run(warmup, total))
            .unwrap_or_else(|e| panic!("{case}: {e:?}"));
        assert_eq!(want.len() as u64, total);
        for (step, &w) in want.iter().enumerate() {
            let (got, w) = (s.lr(step as u64), f64::from_bits(w));
            // torch multiplies the same f64 factor by the same peak: bit for bit.
            assert!(
                got.to_bits() == w.to_bits(),
                "{case} step {step}: anneal {got}, transformers {w}"
            );
        }
        // A schedule that is flat after warmup would not test much.
        let distinct = want.iter().collect::<std::collections::BTreeSet<_>>();
        assert!(
            distinct.len() > 2 || case[0] == "constant",
            "{case}: {want:?}"
        );
    }
}
