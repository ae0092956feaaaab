//! Learning-rate schedules: every step-driven `lr_scheduler_type` of HF
//! transformers, with its `lr_scheduler_kwargs`, computed as transformers'
//! `get_scheduler` computes them (the factor of `LambdaLR`, in f64).

use std::f64::consts::PI;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// `lr_scheduler_type`, HF's names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Scheduler {
    /// Cosine decay to 0 (`num_cycles`, default 0.5).
    Cosine,
    /// Linear decay to 0.
    Linear,
    /// Constant; no warmup (HF's `constant` ignores warmup settings).
    Constant,
    /// Linear warmup, then constant.
    ConstantWithWarmup,
    /// Cosine decay to 0 with `num_cycles` hard restarts (default 1).
    CosineWithRestarts,
    /// Polynomial decay to `lr_end` (default 1e-7) with `power` (default 1).
    Polynomial,
    /// `1 / sqrt((step + timescale - warmup) / timescale)` after warmup.
    InverseSqrt,
    /// Cosine decay to `min_lr` or `min_lr_rate` x the peak.
    CosineWithMinLr,
    /// As `cosine_with_min_lr`, but warmup starts at `warmup_lr_rate` (or
    /// one warmup step's worth) and the decay is one step ahead.
    CosineWarmupWithMinLr,
    /// Warmup, constant, then `num_decay_steps` of decay to `min_lr_ratio`.
    WarmupStableDecay,
}

/// The shape of warmup or decay in `warmup_stable_decay`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Curve {
    Linear,
    Cosine,
    OneMinusSqrt,
}

/// A schedule with its arguments resolved: `lr(step)` for a run of `total`
/// optimizer steps, `warmup` of them warming up.
#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    kind: Scheduler,
    peak: f64,
    warmup: u64,
    total: u64,
    num_cycles: f64,
    min_lr_rate: f64,
    warmup_lr_rate: Option<f64>,
    lr_end: f64,
    power: f64,
    timescale: Option<u64>,
    decay_steps: u64,
    stable_steps: Option<u64>,
    warmup_curve: Curve,
    decay_curve: Curve,
}

/// The `lr_scheduler_kwargs` each schedule takes, as transformers' functions
/// name their arguments.
fn accepted(kind: Scheduler) -> &'static [&'static str] {
    match kind {
        Scheduler::Linear | Scheduler::Constant | Scheduler::ConstantWithWarmup => &[],
        Scheduler::Cosine | Scheduler::CosineWithRestarts => &["num_cycles"],
        Scheduler::Polynomial => &["lr_end", "power"],
        Scheduler::InverseSqrt => &["timescale"],
        Scheduler::CosineWithMinLr => &["num_cycles", "min_lr", "min_lr_rate"],
        Scheduler::CosineWarmupWithMinLr => {
            &["num_cycles", "min_lr", "min_lr_rate", "warmup_lr_rate"]
        }
        Scheduler::WarmupStableDecay => &[
            "num_decay_steps",
            "num_stable_steps",
            "warmup_type",
            "decay_type",
            "min_lr_ratio",
            "num_cycles",
        ],
    }
}

/// A problem with `lr_scheduler_kwargs`: the offending key (under
/// `lr_scheduler_kwargs`, or empty for the whole map) and what to do.
#[derive(Debug, Clone, PartialEq)]
pub struct KwargError {
    /// The key under `lr_scheduler_kwargs`, or "" for the map itself.
    pub key: String,
    /// What is wrong and what to write instead.
    pub message: String,
}

fn bad(key: &str, message: impl Into<String>) -> KwargError {
    KwargError {
        key: key.to_owned(),
        message: message.into(),
    }
}

impl Schedule {
    /// Resolves `kind` with `kwargs` for a peak learning rate of `peak`. Checks
    /// everything that does not depend on the run's length, so a pipeline's
    /// params can be checked before any data is read; `for_run` sets the
    /// length.
    pub fn new(
        kind: Scheduler,
        kwargs: &Map<String, Value>,
        peak: f64,
    ) -> Result<Schedule, KwargError> {
        let name = serde_json::to_value(kind)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        let takes = accepted(kind);
        for key in kwargs.keys() {
            if !takes.contains(&key.as_str()) {
                let what = if takes.is_empty() {
                    format!("`{name}` takes no lr_scheduler_kwargs; remove it")
                } else {
                    format!("`{name}` takes only {}", takes.join(", "))
                };
                return Err(bad(key, format!("`{key}` is not an argument here: {what}")));
            }
        }
        let num = |key: &str| -> Result<Option<f64>, KwargError> {
            match kwargs.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(v) => match v.as_f64().filter(|x| x.is_finite()) {
                    Some(x) => Ok(Some(x)),
                    None => Err(bad(key, format!("`{key}` must be a number, not {v}"))),
                },
            }
        };
        let count = |key: &str| -> Result<Option<u64>, KwargError> {
            match kwargs.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(v) => v.as_u64().map(Some).ok_or_else(|| {
                    bad(
                        key,
                        format!("`{key}` must be a whole number of steps, not {v}"),
                    )
                }),
            }
        };
        let curve = |key: &str| -> Result<Curve, KwargError> {
            match kwargs.get(key) {
                None | Some(Value::Null) => Ok(if key == "warmup_type" {
                    Curve::Linear
                } else {
                    Curve::Cosine
                }),
                Some(Value::String(s)) if s == "linear" => Ok(Curve::Linear),
                Some(Value::String(s)) if s == "cosine" => Ok(Curve::Cosine),
                Some(Value::String(s)) if s == "1-sqrt" => Ok(Curve::OneMinusSqrt),
                Some(v) => Err(bad(
                    key,
                    format!("`{key}` must be 'linear', 'cosine' or '1-sqrt', not {v}"),
                )),
            }
        };
        let default_cycles = if kind == Scheduler::CosineWithRestarts {
            1.0
        } else {
            0.5
        };
        let num_cycles = if kind == Scheduler::CosineWithRestarts {
            count("num_cycles")?.map_or(default_cycles, |c| c as f64)
        } else {
            num("num_cycles")?.unwrap_or(default_cycles)
        };
        if num_cycles <= 0.0 {
            return Err(bad("num_cycles", "`num_cycles` must be positive"));
        }
        let mut min_lr_rate = 0.0;
        if matches!(
            kind,
            Scheduler::CosineWithMinLr | Scheduler::CosineWarmupWithMinLr
        ) {
            min_lr_rate = match (num("min_lr")?, num("min_lr_rate")?) {
                (Some(_), Some(_)) => {
                    return Err(bad(
                        "min_lr",
                        "set one of `min_lr` and `min_lr_rate`, not both",
                    ));
                }
                (Some(m), None) => m / peak,
                (None, Some(r)) => r,
                (None, None) => {
                    return Err(bad(
                        "",
                        format!(
                            "`{name}` needs `min_lr` (a learning rate) or `min_lr_rate` (a share of learning_rate), e.g. lr_scheduler_kwargs: {{min_lr_rate: 0.1}}"
                        ),
                    ));
                }
            };
        }
        if kind == Scheduler::WarmupStableDecay {
            min_lr_rate = num("min_lr_ratio")?.unwrap_or(0.0);
        }
        if !(0.0..=1.0).contains(&min_lr_rate) {
            let key = match kind {
                Scheduler::WarmupStableDecay => "min_lr_ratio",
                _ if kwargs.contains_key("min_lr") => "min_lr",
                _ => "min_lr_rate",
            };
            return Err(bad(
                key,
                format!(
                    "the floor must lie between 0 and learning_rate ({peak}); it is {} x learning_rate",
                    min_lr_rate
                ),
            ));
        }
        let warmup_lr_rate = num("warmup_lr_rate")?;
        if let Some(r) = warmup_lr_rate
            && !(0.0..=1.0).contains(&r)
        {
            return Err(bad("warmup_lr_rate", "`warmup_lr_rate` must be in [0, 1]"));
        }
        let lr_end = num("lr_end")?.unwrap_or(1e-7);
        if kind == Scheduler::Polynomial && !(lr_end >= 0.0 && lr_end < peak) {
            return Err(bad(
                "lr_end",
                format!("`lr_end` ({lr_end}) must be at least 0 and below learning_rate ({peak})"),
            ));
        }
        let power = num("power")?.unwrap_or(1.0);
        if power <= 0.0 {
            return Err(bad("power", "`power` must be positive"));
        }
        let timescale = count("timescale")?;
        if timescale == Some(0) {
            return Err(bad("timescale", "`timescale` must be at least 1"));
        }
        let decay_steps = count("num_decay_steps")?;
        if kind == Scheduler::WarmupStableDecay && decay_steps.is_none() {
            return Err(bad(
                "",
                "`warmup_stable_decay` needs `num_decay_steps`, e.g. lr_scheduler_kwargs: {num_decay_steps: 100}",
            ));
        }
        Ok(Schedule {
            kind,
            peak,
            warmup: 0,
            total: 1,
            num_cycles,
            min_lr_rate,
            warmup_lr_rate,
            lr_end,
            power,
            timescale,
            decay_steps: decay_steps.unwrap_or(0),
            stable_steps: count("num_stable_steps")?,
            warmup_curve: curve("warmup_type")?,
            decay_curve: curve("decay_type")?,
        })
    }

    /// This schedule over a run of `total` steps with `warmup` warmup steps;
    /// an error when the schedule's own step counts do not fit in the run.
    pub fn for_run(mut self, warmup: u64, total: u64) -> Result<Schedule, KwargError> {
        // HF's `constant` ignores warmup settings.
        self.warmup = if self.kind == Scheduler::Constant {
            0
        } else {
            warmup
        };
        self.total = total;
        if self.kind == Scheduler::WarmupStableDecay && self.stable_steps.is_none() {
            let (w, d) = (self.warmup, self.decay_steps);
            if w + d > total {
                return Err(bad(
                    "num_decay_steps",
                    format!(
                        "{w} warmup and {d} decay steps do not fit in this run's {total} steps; \
                         lower num_decay_steps or the warmup"
                    ),
                ));
            }
        }
        Ok(self)
    }

    /// Learning rate at optimizer step `step` (0-based).
    pub fn lr(&self, step: u64) -> f64 {
        self.peak * self.factor(step)
    }

    /// Transformers' `lr_lambda`.
    fn factor(&self, step: u64) -> f64 {
        let (s, w, t) = (step as f64, self.warmup as f64, self.total as f64);
        let progress = || (s - w) / (t - w).max(1.0);
        match self.kind {
            Scheduler::Constant => 1.0,
            Scheduler::WarmupStableDecay => self.wsd(step),
            Scheduler::CosineWarmupWithMinLr => {
                if s < w {
                    return match self.warmup_lr_rate {
                        None => (s + 1.0) / w.max(1.0),
                        Some(r) => r + (1.0 - r) * s / (w - 1.0).max(1.0),
                    };
                }
                let p = (s - w + 1.0) / (t - w).max(1.0);
                self.floor(0.5 * (1.0 + (PI * self.num_cycles * 2.0 * p).cos()))
            }
            _ if step < self.warmup => s / w.max(1.0),
            Scheduler::ConstantWithWarmup => 1.0,
            Scheduler::Linear => ((t - s) / (t - w).max(1.0)).max(0.0),
            Scheduler::Cosine => {
                (0.5 * (1.0 + (PI * self.num_cycles * 2.0 * progress()).cos())).max(0.0)
            }
            Scheduler::CosineWithMinLr => {
                self.floor(0.5 * (1.0 + (PI * self.num_cycles * 2.0 * progress()).cos()))
            }
            Scheduler::CosineWithRestarts => {
                let p = progress();
                if p >= 1.0 {
                    0.0
                } else {
                    (0.5 * (1.0 + (PI * ((self.num_cycles * p) % 1.0)).cos())).max(0.0)
                }
            }
            Scheduler::Polynomial => {
                if step > self.total {
                    self.lr_end / self.peak
                } else {
                    let range = self.peak - self.lr_end;
                    let remaining = 1.0 - (s - w) / (t - w);
                    (range * remaining.powf(self.power) + self.lr_end) / self.peak
                }
            }
            Scheduler::InverseSqrt => {
                let scale =
                    self.timescale
                        .unwrap_or(if self.warmup > 0 { self.warmup } else { 10_000 })
                        as f64;
                1.0 / ((s + scale - w) / scale).sqrt()
            }
        }
    }

    /// `f` scaled into `[min_lr_rate, 1]`.
    fn floor(&self, f: f64) -> f64 {
        (f * (1.0 - self.min_lr_rate) + self.min_lr_rate).max(0.0)
    }

    fn wsd(&self, step: u64) -> f64 {
        let s = step as f64;
        let (w, d) = (self.warmup, self.decay_steps);
        let stable = self
            .stable_steps
            .unwrap_or_else(|| self.total.saturating_sub(w + d));
        if step < w {
            let p = s / (w.max(1)) as f64;
            return self.floor(match self.warmup_curve {
                Curve::Linear => p,
                Curve::Cosine => 0.5 * (1.0 - (PI * p).cos()),
                Curve::OneMinusSqrt => 1.0 - (1.0 - p).sqrt(),
            });
        }
        if step < w + stable {
            return 1.0;
        }
        if step < w + stable + d {
            let p = (s - (w + stable) as f64) / (d.max(1)) as f64;
            return self.floor(match self.decay_curve {
                Curve::Linear => 1.0 - p,
                Curve::Cosine => 0.5 * (1.0 + (PI * self.num_cycles * 2.0 * p).cos()),
                Curve::OneMinusSqrt => 1.0 - p.sqrt(),
            });
        }
        self.min_lr_rate
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sched(kind: Scheduler, kwargs: Value, warmup: u64, total: u64) -> Schedule {
        Schedule::new(kind, kwargs.as_object().unwrap(), 1.0)
            .unwrap()
            .for_run(warmup, total)
            .unwrap()
    }

    #[test]
    fn the_common_schedules_by_hand() {
        // get_cosine_schedule_with_warmup(warmup=2, total=10)
        let c = sched(Scheduler::Cosine, json!({}), 2, 10);
        assert_eq!((c.lr(0), c.lr(1), c.lr(2)), (0.0, 0.5, 1.0));
        assert!((c.lr(6) - 0.5).abs() < 1e-12);
        let l = sched(Scheduler::Linear, json!({}), 0, 4);
        assert_eq!((l.lr(0), l.lr(1), l.lr(3)), (1.0, 0.75, 0.25));
        // get_constant_schedule ignores warmup; constant_with_warmup does not.
        let k = sched(Scheduler::Constant, json!({}), 4, 8);
        assert_eq!((k.lr(0), k.lr(7)), (1.0, 1.0));
        let w = sched(Scheduler::ConstantWithWarmup, json!({}), 4, 8);
        assert_eq!((w.lr(0), w.lr(2), w.lr(4), w.lr(7)), (0.0, 0.5, 1.0, 1.0));
        let m = sched(
            Scheduler::CosineWithMinLr,
            json!({"min_lr_rate": 0.1}),
            0,
            4,
        );
        assert_eq!(m.lr(0), 1.0);
        assert!((m.lr(2) - 0.55).abs() < 1e-12);
    }

    #[test]
    fn kwargs_errors_name_the_key() {
        let e = |kind, kwargs: Value| {
            Schedule::new(kind, kwargs.as_object().unwrap(), 1e-3).unwrap_err()
        };
        let x = e(Scheduler::Cosine, json!({"min_lr": 1e-5}));
        assert_eq!(x.key, "min_lr");
        assert!(x.message.contains("takes only num_cycles"), "{x:?}");
        let x = e(Scheduler::Linear, json!({"power": 2}));
        assert!(x.message.contains("takes no lr_scheduler_kwargs"), "{x:?}");
        let x = e(Scheduler::CosineWithMinLr, json!({}));
        assert!(x.message.contains("min_lr_rate: 0.1"), "{x:?}");
        let x = e(Scheduler::CosineWithMinLr, json!({"min_lr": 1e-2}));
        assert_eq!(x.key, "min_lr");
        let x = e(
            Scheduler::WarmupStableDecay,
            json!({"num_decay_steps": 10, "decay_type": "exp"}),
        );
        assert_eq!(x.key, "decay_type");
        let x = e(Scheduler::Polynomial, json!({"lr_end": 1e-2}));
        assert_eq!(x.key, "lr_end");
        let x = e(Scheduler::CosineWithRestarts, json!({"num_cycles": 1.5}));
        assert!(x.message.contains("whole number"), "{x:?}");
        let run = Schedule::new(
            Scheduler::WarmupStableDecay,
            json!({"num_decay_steps": 10}).as_object().unwrap(),
            1e-3,
        )
        .unwrap()
        .for_run(2, 8)
        .unwrap_err();
        assert_eq!(run.key, "num_decay_steps");
    }
}
