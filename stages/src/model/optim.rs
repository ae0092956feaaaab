//! AdamW and global-norm gradient clipping with PyTorch's semantics
//! (`torch.optim.AdamW`, `clip_grad_norm_`), which burn's own optimizer does
//! not follow (its defaults differ: eps 1e-5, decay on every tensor, per-tensor
//! clipping). Parameters are named by their module path
//! (`layers.0.self_attn.q_proj.weight`), so decay groups and saved state follow
//! names, not run-local ids.

use std::collections::BTreeMap;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::ops::FloatTensor;
use burn::tensor::{ElementConversion, Tensor, TensorData, TensorPrimitive};

use super::backend::ModelBackend;
use super::weights::HostTensor;

/// Gradients of the trainable parameters, flattened, summed over micro-batches.
#[derive(Debug)]
pub struct Grads<B: Backend> {
    /// Parameter path -> gradient.
    pub map: BTreeMap<String, Tensor<B, 1>>,
}

impl<B: Backend> Default for Grads<B> {
    fn default() -> Self {
        Grads {
            map: BTreeMap::new(),
        }
    }
}

struct Collect<'a, AB: AutodiffBackend> {
    grads: &'a AB::Gradients,
    path: Vec<String>,
    out: &'a mut Grads<AB::InnerBackend>,
}

impl<AB: AutodiffBackend> ModuleVisitor<AB> for Collect<'_, AB> {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_owned());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<AB, D>>) {
        if let Some(g) = param.val().grad(self.grads) {
            let n = g.shape().num_elements();
            let g = g.reshape([n]);
            let name = self.path.join(".");
            let sum = match self.out.map.remove(&name) {
                Some(prev) => prev + g,
                None => g,
            };
            self.out.map.insert(name, sum);
        }
    }
}

impl<B: Backend> Grads<B> {
    /// Adds the gradients of `module`'s parameters from one backward pass.
    pub fn accumulate<AB, M>(&mut self, module: &M, grads: &AB::Gradients)
    where
        AB: AutodiffBackend<InnerBackend = B>,
        M: Module<AB>,
    {
        let mut v = Collect::<AB> {
            grads,
            path: Vec::new(),
            out: self,
        };
        module.visit(&mut v);
    }

    /// The L2 norm of all gradients together, as a one-element tensor left
    /// on the device (reading it is a sync on a GPU); `None` without gradients.
    pub fn norm_tensor(&self) -> Option<Tensor<B, 1>> {
        let parts: Vec<Tensor<B, 1>> = self
            .map
            .values()
            .map(|g| g.clone().square().sum())
            .collect();
        (!parts.is_empty()).then(|| Tensor::cat(parts, 0).sum().sqrt())
    }

    /// `clip_grad_norm_` as torch computes it, on the device: every gradient
    /// is multiplied by `min(1, max_norm / (norm + 1e-6))`, so the step needs
    /// no round trip to the host. Returns the norm before clipping, on the
    /// device; `None` without gradients.
    pub fn clip_tensor(&mut self, max_norm: f64) -> Option<Tensor<B, 1>> {
        let norm = self.norm_tensor()?;
        let coef = norm
            .clone()
            .add_scalar(1e-6)
            .recip()
            .mul_scalar(max_norm)
            .clamp_max(1.0);
        for g in self.map.values_mut() {
            *g = g.clone() * coef.clone();
        }
        Some(norm)
    }

    /// [`Grads::clip_tensor`], read back.
    pub fn clip(&mut self, max_norm: f64) -> f64 {
        self.clip_tensor(max_norm)
            .map_or(0.0, |t| t.into_scalar().elem::<f64>())
    }
}

/// AdamW settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    /// `betas[0]`.
    pub beta1: f64,
    /// `betas[1]`.
    pub beta2: f64,
    /// Added to the denominator (torch's default 1e-8).
    pub eps: f64,
    /// Decoupled weight decay, not applied to parameters whose name contains
    /// `bias` or `norm`.
    pub weight_decay: f64,
    /// LoRA+: the LoRA `B` factors (and DoRA's magnitudes) learn (and decay)
    /// at this multiple of the learning rate (1: plain LoRA).
    pub lora_b_lr_ratio: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            lora_b_lr_ratio: 1.0,
        }
    }
}

/// Whether weight decay applies to the parameter at `path`.
pub fn decays(path: &str) -> bool {
    !(path.contains("bias") || path.contains("norm"))
}

/// Whether the parameter at `path` belongs to a mixture's routed experts.
fn routed_expert(path: &str) -> bool {
    path.contains(".experts.")
}

/// The scalars of one AdamW update of one parameter at step `t`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWStep {
    /// `1 - lr * weight_decay` where the parameter decays.
    pub decay: Option<f64>,
    /// `betas[0]`.
    pub beta1: f64,
    /// `betas[1]`.
    pub beta2: f64,
    /// `sqrt(1 - beta2^t)`.
    pub bias_correction2_sqrt: f64,
    /// Added to the denominator.
    pub eps: f64,
    /// `lr / (1 - beta1^t)`.
    pub step_size: f64,
}

/// One AdamW update of a flat parameter `p` with gradient `g` and moments
/// `m`, `v`, as torch's (non-fused) `AdamW` computes it:
/// `p = p * decay - m' / (sqrt(v') / bc2 + eps) * step_size`. Returns the
/// new `[p, m, v]`.
pub(crate) fn adamw_ops<B: Backend>(
    [p, g, m, v]: [Tensor<B, 1>; 4],
    s: AdamWStep,
) -> [Tensor<B, 1>; 3] {
    let p = match s.decay {
        Some(d) => p.mul_scalar(d),
        None => p,
    };
    let m = m.mul_scalar(s.beta1) + g.clone().mul_scalar(1.0 - s.beta1);
    let v = v.mul_scalar(s.beta2) + g.square().mul_scalar(1.0 - s.beta2);
    let denom = v
        .clone()
        .sqrt()
        .div_scalar(s.bias_correction2_sqrt)
        .add_scalar(s.eps);
    let p = p - (m.clone() / denom).mul_scalar(s.step_size);
    [p, m, v]
}

/// [`adamw_ops`] on primitives.
pub(crate) fn adamw_of<B: Backend>(t: [FloatTensor<B>; 4], s: AdamWStep) -> [FloatTensor<B>; 3] {
    adamw_ops::<B>(
        t.map(|x| Tensor::from_primitive(TensorPrimitive::Float(x))),
        s,
    )
    .map(|x| x.into_primitive().tensor())
}

/// Flex, f32: the update in one parallel pass, in place where the tensors
/// are not shared.
pub(crate) mod flex {
    use crate::model::backend::flex_unique_f32;
    use crate::model::vmath;
    use burn_flex::FlexTensor;
    use rayon::prelude::*;

    use super::AdamWStep;

    /// Elements per rayon task.
    const CHUNK: usize = 1 << 14;

    /// Whether [`adamw`] applies: all f32, contiguous, of one length.
    pub(crate) fn applies(t: &[FlexTensor; 4]) -> bool {
        let n = t[0].layout().num_elements();
        t.iter()
            .all(|x| x.layout().num_elements() == n && x.as_slice::<f32>().is_some())
    }

    /// `[p, m, v]` updated, for tensors that [`applies`] accepts.
    pub(crate) fn adamw(t: [FlexTensor; 4], s: AdamWStep) -> [FlexTensor; 3] {
        assert!(
            applies(&t),
            "AdamW's loop needs contiguous f32 tensors of one length"
        );
        let [p, g, m, v] = t;
        let [mut p, mut m, mut v] = [p, m, v].map(flex_unique_f32);
        let g = g.as_slice::<f32>().expect("checked contiguous f32");
        {
            let unique = "flex_unique_f32 made it unique";
            let pw = p.try_storage_mut::<f32>().expect(unique);
            let mw = m.try_storage_mut::<f32>().expect(unique);
            let vw = v.try_storage_mut::<f32>().expect(unique);
            pw.par_chunks_mut(CHUNK)
                .zip(mw.par_chunks_mut(CHUNK))
                .zip(vw.par_chunks_mut(CHUNK))
                .zip(g.par_chunks(CHUNK))
                .for_each(|(((pc, mc), vc), gc)| vmath::adamw(pc, mc, vc, gc, &s));
        }
        [p, m, v]
    }
}

/// AdamW with its moment estimates.
#[derive(Debug)]
pub struct AdamW<B: Backend> {
    /// Settings.
    pub config: AdamWConfig,
    /// Steps taken.
    pub step: u64,
    /// Parameter path -> (first moment, second moment), flattened.
    pub moments: BTreeMap<String, (Tensor<B, 1>, Tensor<B, 1>)>,
}

struct Update<'a, AB: AutodiffBackend> {
    opt: &'a mut AdamW<AB::InnerBackend>,
    grads: &'a Grads<AB::InnerBackend>,
    lr: f64,
    path: Vec<String>,
}

impl<AB: AutodiffBackend<InnerBackend: ModelBackend>> ModuleMapper<AB> for Update<'_, AB> {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_owned());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<AB, D>>) -> Param<Tensor<AB, D>> {
        let name = self.path.join(".");
        let g = match self.grads.map.get(&name) {
            Some(g) => g.clone(),
            // A trainable weight the batch did not reach: an expert no token
            // was routed to. Torch holds a mixture's experts (and PEFT their
            // adapters) in one tensor per projection, whose gradient is zero
            // there, so AdamW still decays them and moves them by momentum.
            None if routed_expert(&name) && param.val().is_require_grad() => {
                let p = param.val();
                Tensor::zeros([p.shape().num_elements()], &p.device())
            }
            None => return param,
        };
        let (id, tensor, mapper) = param.consume();
        let dims = tensor.dims();
        let n = tensor.shape().num_elements();
        let p = tensor.inner().reshape([n]);
        let c = self.opt.config;
        let t = self.opt.step as i32;
        // Torch's per-group rate: LoRA+ puts the B factors (and DoRA's
        // magnitudes, as every 1-d adapter weight) in a group of their own.
        let lr = if name.ends_with("lora_b") || name.ends_with("lora.magnitude") {
            self.lr * c.lora_b_lr_ratio
        } else {
            self.lr
        };
        let (m, v) = match self.opt.moments.remove(&name) {
            Some(mv) => mv,
            None => (p.zeros_like(), p.zeros_like()),
        };
        let s = AdamWStep {
            decay: (c.weight_decay != 0.0 && decays(&name)).then_some(1.0 - lr * c.weight_decay),
            beta1: c.beta1,
            beta2: c.beta2,
            bias_correction2_sqrt: (1.0 - c.beta2.powi(t)).sqrt(),
            eps: c.eps,
            step_size: lr / (1.0 - c.beta1.powi(t)),
        };
        let [p, m, v] =
            AB::InnerBackend::adamw([p, g, m, v].map(|x| x.into_primitive().tensor()), s)
                .map(|x| Tensor::<AB::InnerBackend, 1>::from_primitive(TensorPrimitive::Float(x)));
        self.opt.moments.insert(name, (m, v));
        let p = Tensor::<AB, D>::from_inner(p.reshape(dims)).require_grad();
        Param::from_mapped_value(id, p, mapper)
    }
}

impl<B: Backend> AdamW<B> {
    /// A fresh optimizer.
    pub fn new(config: AdamWConfig) -> Self {
        AdamW {
            config,
            step: 0,
            moments: BTreeMap::new(),
        }
    }

    /// One update of every parameter of `module` that has a gradient in
    /// `grads`, and of every trainable weight of a routed expert (whose
    /// gradient is zero where no token reached it).
    pub fn step<AB, M>(&mut self, module: M, grads: &Grads<B>, lr: f64) -> M
    where
        B: ModelBackend,
        AB: AutodiffBackend<InnerBackend = B>,
        M: Module<AB>,
    {
        self.step += 1;
        let mut u = Update::<AB> {
            opt: self,
            grads,
            lr,
            path: Vec::new(),
        };
        module.map(&mut u)
    }

    /// The moments as host tensors named `<path>.exp_avg` / `<path>.exp_avg_sq`.
    pub fn state_tensors(&self) -> BTreeMap<String, HostTensor> {
        let mut out = BTreeMap::new();
        for (name, (m, v)) in &self.moments {
            for (suffix, t) in [("exp_avg", m), ("exp_avg_sq", v)] {
                let data = t.to_data().convert::<f32>().into_vec().expect("f32");
                out.insert(
                    format!("{name}.{suffix}"),
                    HostTensor {
                        shape: vec![data.len()],
                        data,
                    },
                );
            }
        }
        out
    }

    /// Restores moments saved by [`AdamW::state_tensors`].
    pub fn load_state(
        &mut self,
        step: u64,
        tensors: BTreeMap<String, HostTensor>,
        device: &B::Device,
    ) -> anyhow::Result<()> {
        self.step = step;
        self.moments.clear();
        let mut avg = BTreeMap::new();
        let mut sq = BTreeMap::new();
        for (k, t) in tensors {
            let n = t.data.len();
            let tensor = Tensor::<B, 1>::from_data(TensorData::new(t.data, [n]), device);
            if let Some(name) = k.strip_suffix(".exp_avg_sq") {
                sq.insert(name.to_owned(), tensor);
            } else if let Some(name) = k.strip_suffix(".exp_avg") {
                avg.insert(name.to_owned(), tensor);
            } else {
                anyhow::bail!("optimizer state has an unexpected tensor '{k}'");
            }
        }
        for (name, m) in avg {
            let v = sq
                .remove(&name)
                .ok_or_else(|| anyhow::anyhow!("optimizer state lacks '{name}.exp_avg_sq'"))?;
            self.moments.insert(name, (m, v));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;
    use burn::tensor::Distribution;

    /// Flex's one-pass update against the tensor ops, with and without
    /// decay, at step 1 (zero moments) and at a later step, over more
    /// elements than one parallel chunk.
    #[test]
    fn flex_loop_matches_the_tensor_ops() {
        let device = Default::default();
        let n = 40_000;
        let rand = |sd: f64| Tensor::<Flex, 1>::random([n], Distribution::Normal(0.0, sd), &device);
        let (p, g) = (rand(1.0), rand(0.1));
        let (m, v) = (rand(0.01), rand(1e-3).abs());
        for (t, decay, m, v) in [
            (1, None, p.zeros_like(), p.zeros_like()),
            (7, Some(1.0 - 1e-3 * 0.1), m.clone(), v.clone()),
        ] {
            let s = AdamWStep {
                decay,
                beta1: 0.9,
                beta2: 0.999,
                bias_correction2_sqrt: (1.0f64 - 0.999f64.powi(t)).sqrt(),
                eps: 1e-8,
                step_size: 1e-3 / (1.0 - 0.9f64.powi(t)),
            };
            let inputs = [p.clone(), g.clone(), m, v];
            let want = adamw_ops(inputs.clone(), s);
            let inputs = inputs.map(|x| x.into_primitive().tensor());
            assert!(
                flex::applies(&inputs),
                "f32 contiguous tensors take the loop"
            );
            let got = flex::adamw(inputs, s);
            for (name, (a, b)) in ["p", "m", "v"].iter().zip(got.into_iter().zip(want)) {
                let a = Tensor::<Flex, 1>::from_primitive(TensorPrimitive::Float(a));
                let scale: f32 = b.clone().abs().max().into_scalar();
                let diff: f32 = (a - b).abs().max().into_scalar();
                assert!(
                    diff <= 1e-6 * scale,
                    "step {t}: {name} off by {diff:e} (largest {scale:e})"
                );
            }
        }
    }
}
