//! Learning-rate schedules: every `lr_scheduler_type` of HF transformers,
//! with its `lr_scheduler_kwargs`, computed as transformers' `get_scheduler`
//! computes them: the factor of `LambdaLR` in f64 for the step-driven ones,
//! and torch's `ReduceLROnPlateau` and transformers' `GreedyLR` for the two
//! driven by the validation loss.

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
    /// Constant until the validation loss stops improving for `patience`
    /// evaluations (default 10), then times `factor` (default 0.1): torch's
    /// `ReduceLROnPlateau`. No warmup, as in transformers.
    ReduceLrOnPlateau,
    /// transformers' `GreedyLR`: times `factor` (default 0.95) after
    /// `patience` evaluations without improvement, divided by it after
    /// `patience` improving ones, within `[min_lr, max_lr]`. No warmup.
    Greedy,
}

impl Scheduler {
    /// HF's name, as `lr_scheduler_type` takes it.
    pub fn name(self) -> String {
        serde_json::to_value(self)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default()
    }

    /// Whether the rate follows the validation loss rather than the step, so
    /// the run must evaluate during training.
    pub fn needs_metric(self) -> bool {
        matches!(self, Scheduler::ReduceLrOnPlateau | Scheduler::Greedy)
    }
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
    /// The settings of a schedule driven by the validation loss.
    adaptive: Option<Adaptive>,
    /// What it has seen so far.
    state: AdaptiveState,
}

/// The settings of `reduce_lr_on_plateau` and `greedy`, under torch's and
/// transformers' argument names.
#[derive(Debug, Clone, PartialEq)]
struct Adaptive {
    greedy: bool,
    /// `mode: max`: higher is better.
    maximize: bool,
    factor: f64,
    patience: u64,
    threshold: f64,
    /// `threshold_mode: rel` (else `abs`).
    relative: bool,
    cooldown: u64,
    /// Greedy: evaluations ignored after a raise.
    warmup: u64,
    min_lr: f64,
    max_lr: f64,
    eps: f64,
    /// Greedy: the window of the streaming average, with `smooth: true`.
    smooth: Option<usize>,
    /// Greedy: reductions at the floor before the schedule starts over.
    reset_start: i64,
}

/// What a loss-driven schedule keeps between evaluations (the counters of
/// torch's and transformers' classes), saved with each checkpoint.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
struct AdaptiveState {
    lr: f64,
    /// The best metric so far; none yet is torch's `inf` (JSON has none).
    best: Option<f64>,
    num_bad: u64,
    num_good: u64,
    cooldown_counter: u64,
    warmup_counter: u64,
    reset_start: i64,
    /// Greedy's streaming average: the window and its running sum.
    window: Vec<f64>,
    sum: f64,
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
        Scheduler::ReduceLrOnPlateau => &[
            "mode",
            "factor",
            "patience",
            "threshold",
            "threshold_mode",
            "cooldown",
            "min_lr",
            "eps",
        ],
        Scheduler::Greedy => &[
            "mode",
            "factor",
            "patience",
            "threshold",
            "threshold_mode",
            "cooldown",
            "warmup",
            "min_lr",
            "max_lr",
            "eps",
            "verbose",
            "smooth",
            "window_size",
            "reset_start",
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

/// `kwargs[key]` as a finite number that `ok` accepts (`None` when missing
/// or null); the error says it must be `what`.
fn number(
    kwargs: &Map<String, Value>,
    key: &str,
    what: &str,
    ok: impl Fn(f64) -> bool,
) -> Result<Option<f64>, KwargError> {
    match kwargs.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_f64()
            .filter(|x| x.is_finite() && ok(*x))
            .map(Some)
            .ok_or_else(|| bad(key, format!("`{key}` must be {what}, not {v}"))),
    }
}

/// `kwargs[key]` as a whole number of `unit` (`None` when missing or null).
fn whole(kwargs: &Map<String, Value>, key: &str, unit: &str) -> Result<Option<u64>, KwargError> {
    match kwargs.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_u64().map(Some).ok_or_else(|| {
            bad(
                key,
                format!("`{key}` must be a whole number of {unit}, not {v}"),
            )
        }),
    }
}

/// Reads the arguments of `reduce_lr_on_plateau` or `greedy` with torch's
/// and transformers' defaults.
fn adaptive(
    kind: Scheduler,
    kwargs: &Map<String, Value>,
    peak: f64,
) -> Result<Adaptive, KwargError> {
    let greedy = kind == Scheduler::Greedy;
    let num = |key: &str, default: f64| -> Result<f64, KwargError> {
        Ok(number(kwargs, key, "a number of at least 0", |x| x >= 0.0)?.unwrap_or(default))
    };
    let count = |key: &str, default: u64| -> Result<u64, KwargError> {
        Ok(whole(kwargs, key, "evaluations")?.unwrap_or(default))
    };
    let choice = |key: &str, a: &str, b: &str, default: &str| -> Result<bool, KwargError> {
        match kwargs.get(key) {
            None | Some(Value::Null) => Ok(default == a),
            Some(Value::String(s)) if s == a => Ok(true),
            Some(Value::String(s)) if s == b => Ok(false),
            Some(v) => Err(bad(key, format!("`{key}` must be '{a}' or '{b}', not {v}"))),
        }
    };
    let flag = |key: &str| -> Result<bool, KwargError> {
        match kwargs.get(key) {
            None | Some(Value::Null) => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(v) => Err(bad(key, format!("`{key}` must be true or false, not {v}"))),
        }
    };
    let factor = num("factor", if greedy { 0.95 } else { 0.1 })?;
    if !(factor > 0.0 && factor < 1.0) {
        return Err(bad(
            "factor",
            format!("`factor` must lie between 0 and 1 (exclusive), not {factor}"),
        ));
    }
    let min_lr = num("min_lr", if greedy { 1e-3 } else { 0.0 })?;
    let max_lr = num("max_lr", 1.0)?;
    if greedy && max_lr < min_lr {
        return Err(bad(
            "max_lr",
            format!("`max_lr` ({max_lr}) must be at least `min_lr` ({min_lr})"),
        ));
    }
    if greedy && kwargs.get("min_lr").is_none() && peak < min_lr {
        // GreedyLR's default floor (1e-3) is above the usual fine-tuning
        // rates: it would only ever raise the rate.
        return Err(bad(
            "min_lr",
            format!(
                "greedy's default min_lr (1e-3) is above learning_rate ({peak});                  set lr_scheduler_kwargs.min_lr, e.g. {{min_lr: {:e}}}",
                peak / 10.0
            ),
        ));
    }
    flag("verbose")?;
    let smooth = flag("smooth")?;
    let window = count("window_size", 50)?;
    if smooth && window == 0 {
        return Err(bad("window_size", "`window_size` must be at least 1"));
    }
    Ok(Adaptive {
        greedy,
        maximize: !choice("mode", "min", "max", "min")?,
        factor,
        patience: count("patience", 10)?,
        threshold: num("threshold", if greedy { 1e-6 } else { 1e-4 })?,
        relative: choice(
            "threshold_mode",
            "rel",
            "abs",
            if greedy { "abs" } else { "rel" },
        )?,
        cooldown: count("cooldown", 0)?,
        warmup: count("warmup", 0)?,
        min_lr,
        max_lr,
        eps: num("eps", 1e-8)?,
        smooth: smooth.then_some(window as usize),
        reset_start: count("reset_start", 500)? as i64,
    })
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
        let name = kind.name();
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
        let num = |key: &str| number(kwargs, key, "a number", |_| true);
        let count = |key: &str| whole(kwargs, key, "steps");
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
        let adaptive = match kind.needs_metric() {
            true => Some(adaptive(kind, kwargs, peak)?),
            false => None,
        };
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
            state: AdaptiveState {
                lr: peak,
                reset_start: adaptive.as_ref().map_or(0, |a| a.reset_start),
                ..AdaptiveState::default()
            },
            adaptive,
        })
    }

    /// This schedule over a run of `total` steps with `warmup` warmup steps;
    /// an error when the schedule's own step counts do not fit in the run.
    pub fn for_run(mut self, warmup: u64, total: u64) -> Result<Schedule, KwargError> {
        // HF's `constant` and the loss-driven schedules ignore warmup settings.
        self.warmup = if self.kind == Scheduler::Constant || self.kind.needs_metric() {
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

    /// Learning rate at optimizer step `step` (0-based); for a loss-driven
    /// schedule, the rate after the evaluations it has seen.
    pub fn lr(&self, step: u64) -> f64 {
        match self.adaptive {
            Some(_) => self.state.lr,
            None => self.peak * self.factor(step),
        }
    }

    /// Feeds a loss-driven schedule one evaluation's metric (a no-op for the
    /// step-driven ones): torch's `ReduceLROnPlateau.step` or transformers'
    /// `GreedyLR.step`, in the same order of f64 operations.
    pub fn observe(&mut self, metric: f64) {
        let Some(a) = &self.adaptive else { return };
        let st = &mut self.state;
        let mut current = metric;
        if let Some(window) = a.smooth {
            st.window.push(current);
            st.sum += current;
            if st.window.len() > window {
                st.sum -= st.window.remove(0);
            }
            current = st.sum / st.window.len() as f64;
        }
        let worse = if a.maximize {
            f64::NEG_INFINITY
        } else {
            f64::INFINITY
        };
        let best = st.best.unwrap_or(worse);
        let better = match (a.maximize, a.relative) {
            (false, true) => current < best * (1.0 - a.threshold),
            (false, false) => current < best - a.threshold,
            (true, true) => current > best * (a.threshold + 1.0),
            (true, false) => current > best + a.threshold,
        };
        let reduce = |st: &mut AdaptiveState| {
            let new = (st.lr * a.factor).max(a.min_lr);
            if st.lr - new > a.eps {
                st.lr = new;
            }
        };
        if !a.greedy {
            if better {
                st.best = Some(current);
                st.num_bad = 0;
            } else {
                st.num_bad += 1;
            }
            if st.cooldown_counter > 0 {
                st.cooldown_counter -= 1;
                st.num_bad = 0;
            }
            if st.num_bad > a.patience {
                reduce(st);
                st.cooldown_counter = a.cooldown;
                st.num_bad = 0;
            }
            return;
        }
        if st.cooldown_counter > 0 {
            st.cooldown_counter -= 1;
            (st.num_bad, st.num_good) = (0, 0);
        } else if st.warmup_counter > 0 {
            st.warmup_counter -= 1;
            (st.num_bad, st.num_good) = (0, 0);
        } else {
            if better {
                st.best = Some(current);
                st.num_bad = 0;
                st.num_good += 1;
            } else {
                st.num_bad += 1;
                st.num_good = 0;
            }
            if st.num_good > a.patience {
                let new = (st.lr / a.factor).min(a.max_lr);
                if new - st.lr > a.eps {
                    st.lr = new;
                }
                st.reset_start = a.reset_start;
                st.warmup_counter = a.warmup;
                st.num_good = 0;
            } else if st.num_bad > a.patience {
                reduce(st);
                if st.lr <= a.min_lr {
                    st.reset_start -= 1;
                    if st.reset_start <= 0 {
                        // Back to the start: the peak rate, no history.
                        *st = AdaptiveState {
                            lr: self.peak,
                            reset_start: a.reset_start,
                            ..AdaptiveState::default()
                        };
                    }
                }
                st.cooldown_counter = a.cooldown;
                st.num_bad = 0;
            }
        }
    }

    /// The state a loss-driven schedule needs to resume (none for the
    /// step-driven ones, which follow the step alone).
    pub fn state(&self) -> Value {
        match self.adaptive {
            Some(_) => serde_json::to_value(&self.state).unwrap_or(Value::Null),
            None => Value::Null,
        }
    }

    /// Restores what [`Self::state`] saved.
    pub fn restore(&mut self, state: &Value) -> Result<(), String> {
        if self.adaptive.is_none() {
            return Ok(());
        }
        self.state = serde_json::from_value(state.clone()).map_err(|e| {
            format!("the saved state of the learning-rate schedule is unreadable ({e})")
        })?;
        Ok(())
    }

    /// Transformers' `lr_lambda`.
    fn factor(&self, step: u64) -> f64 {
        let (s, w, t) = (step as f64, self.warmup as f64, self.total as f64);
        let progress = || (s - w) / (t - w).max(1.0);
        match self.kind {
            Scheduler::Constant | Scheduler::ReduceLrOnPlateau | Scheduler::Greedy => 1.0,
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
        // GreedyLR's default floor is above this peak (1e-3 > 1e-4).
        let x = Schedule::new(Scheduler::Greedy, &Map::new(), 1e-4).unwrap_err();
        assert_eq!(x.key, "min_lr");
        let x = e(Scheduler::ReduceLrOnPlateau, json!({"factor": 1.0}));
        assert_eq!(x.key, "factor");
        let x = e(Scheduler::ReduceLrOnPlateau, json!({"mode": "lowest"}));
        assert!(x.message.contains("'min' or 'max'"), "{x:?}");
        let x = e(Scheduler::ReduceLrOnPlateau, json!({"warmup": 2}));
        assert!(x.message.contains("takes only mode"), "{x:?}");
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
