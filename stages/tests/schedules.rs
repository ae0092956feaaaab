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

/// Prints, for each case `[name, kwargs, peak, metrics]`, the learning rate
/// after each `step(metric)` of the scheduler `get_scheduler` builds (torch's
/// `ReduceLROnPlateau`, transformers' `GreedyLR`), as f64 bits.
const HF_METRIC: &str = r#"
import json, struct, sys, warnings
import torch
from transformers import get_scheduler
warnings.simplefilter("ignore")
out = []
for name, kwargs, peak, metrics in json.loads(sys.argv[1]):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    s = get_scheduler(name, opt, num_warmup_steps=3, num_training_steps=len(metrics),
                      scheduler_specific_kwargs=kwargs)
    lrs = []
    for m in metrics:
        s.step(m)
        lrs.append(struct.unpack("<Q", struct.pack("<d", opt.param_groups[0]["lr"]))[0])
    out.append(lrs)
print(json.dumps(out))
"#;

/// `reduce_lr_on_plateau` and `greedy` fed the same validation losses as
/// torch's and transformers' classes: the same rate after every evaluation,
/// bit for bit, also when the state is saved and restored halfway (as a
/// resumed run restores it from its checkpoint).
#[test]
fn loss_driven_schedules_match_transformers() {
    // Falls, stalls, falls again, then stalls for good.
    let wave: Vec<f64> = [
        5.0, 4.0, 4.5, 4.2, 4.1, 4.3, 3.0, 3.5, 3.6, 2.9, 2.95, 2.9, 2.8, 2.8, 2.8, 2.8, 2.8, 2.8,
        2.8, 2.8, 2.8, 2.8, 2.8, 2.8,
    ]
    .to_vec();
    let falling: Vec<f64> = (0..30).map(|i| 3.0 - 0.05 * i as f64).collect();
    let rising: Vec<f64> = wave.iter().map(|x| 10.0 - x).collect();
    let stall = vec![3.0; 16];
    let cases = json!([
        ["reduce_lr_on_plateau", {}, 1e-4, wave],
        ["reduce_lr_on_plateau", {"patience": 1, "factor": 0.5}, 1e-4, wave],
        ["reduce_lr_on_plateau", {"patience": 0, "factor": 0.3, "cooldown": 2, "min_lr": 2e-6,
            "threshold": 0.01, "threshold_mode": "abs"}, 1e-4, wave],
        ["reduce_lr_on_plateau", {"patience": 1, "mode": "max", "eps": 1e-3}, 1e-2, rising],
        ["greedy", {"min_lr": 1e-6, "patience": 1, "factor": 0.5, "max_lr": 4e-4}, 1e-4, wave],
        ["greedy", {"min_lr": 1e-5, "patience": 0, "factor": 0.5, "cooldown": 1, "warmup": 2,
            "reset_start": 2, "threshold_mode": "rel", "threshold": 1e-3, "max_lr": 1.5e-3},
            1e-4, wave],
        // Raised once, then down to the floor, where the second reduction
        // starts it over.
        ["greedy", {"min_lr": 2.5e-5, "patience": 0, "factor": 0.5, "reset_start": 2, "cooldown": 1},
            1e-4,
            stall],
        ["greedy", {"min_lr": 1e-6, "patience": 2, "factor": 0.8, "max_lr": 1e-3}, 1e-4, falling],
        ["greedy", {"min_lr": 1e-6, "patience": 1, "smooth": true, "window_size": 3,
            "mode": "max", "verbose": false}, 1e-4, rising]
    ]);
    let cases_arg = cases.to_string();
    let out = common::python_json(HF_METRIC, &[cases_arg.as_ref()], "torch transformers");
    let hf: Vec<Vec<u64>> = serde_json::from_value(out).expect("lists of f64 bits");
    for (case, want) in cases.as_array().unwrap().iter().zip(&hf) {
        let kind: Scheduler = serde_json::from_value(case[0].clone()).unwrap();
        let metrics: Vec<f64> = serde_json::from_value(case[3].clone()).unwrap();
        let new = || {
            Schedule::new(
                kind,
                case[1].as_object().unwrap(),
                case[2].as_f64().unwrap(),
            )
            .and_then(|s| s.for_run(3, metrics.len() as u64))
            .unwrap_or_else(|e| panic!("{case}: {e:?}"))
        };
        let mut s = new();
        // No warmup: the peak rate from the first step, as in transformers.
        assert_eq!(s.lr(0), case[2].as_f64().unwrap(), "{case}");
        for (i, (&m, &w)) in metrics.iter().zip(want).enumerate() {
            if i == metrics.len() / 2 {
                // Through JSON, as a checkpoint's state.json holds it.
                let saved: serde_json::Value =
                    serde_json::from_str(&s.state().to_string()).unwrap();
                s = new();
                s.restore(&saved).unwrap();
            }
            s.observe(m);
            let (got, w) = (s.lr(100), f64::from_bits(w));
            assert!(
                got.to_bits() == w.to_bits(),
                "{case} after metric {i}: anneal {got}, transformers {w}"
            );
        }
        // A case whose rate never moved would not test much.
        let distinct = want.iter().collect::<std::collections::BTreeSet<_>>();
        assert!(distinct.len() >= 2, "{case}: {want:?}");
    }
}
