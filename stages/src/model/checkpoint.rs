//! Gradient checkpointing (HF's `gradient_checkpointing`): a micro-batch's
//! loss and gradients with only each decoder layer's input kept from the
//! forward pass, and the layer's activations recomputed, one layer at a
//! time, in the backward pass.
//!
//! The forward pass runs on the backend autodiff wraps, so it records no
//! graph; it keeps the `[batch, seq, hidden]` input of every layer. The
//! final norm, the LM head and the loss then run under autodiff on the last
//! layer's output, and their backward pass gives that output's gradient.
//! Going down the layers, each one runs again under autodiff from its kept
//! input, and the backward pass of `sum(output * gradient)` gives its
//! parameters' gradients and its input's gradient, the next layer's output
//! gradient. Peak activation memory is one layer's instead of all of them,
//! for one more forward pass of the layers.
//!
//! A mixture of experts' load-balancing loss (`CausalLm::router_aux_loss_coef`)
//! is linear in each layer's router probabilities, with weights that the
//! first pass's routing fixes
//! ([`Routing::weights`](super::decoder::Routing::weights)); each layer's part joins
//! its recomputed backward pass.
//!
//! Each layer's LoRA dropout masks come from a seed of its own
//! (`CausalLm::seed_layer`), drawn the same in both passes and as
//! [`CausalLm::train_loss`] draws them, so checkpointing does not change
//! what is trained.

use burn::module::{AutodiffModule, Module, ModuleVisitor, Param};
use burn::tensor::Tensor;
use burn::tensor::backend::AutodiffBackend;

use super::backend::TrainBackend;
use super::decoder::{CausalLm, DecoderLayer, Positions};
use super::optim::Grads;

/// Adds to `grads` the gradients of `loss * k / total` for one micro-batch
/// (`k` counted tokens out of the step's `total`), as
/// [`CausalLm::train_loss`] followed by its backward pass would, and returns
/// that scaled loss and `k`; `None` when no token of the micro-batch counts.
pub fn loss_and_grads<B: TrainBackend>(
    net: &CausalLm<B>,
    ids: &[Vec<u32>],
    pos: &Positions<B>,
    labels: &[Vec<i64>],
    seed: u64,
    total: usize,
    grads: &mut Grads<B::InnerBackend>,
) -> Option<(Tensor<B::InnerBackend, 1>, usize)> {
    let device = net.embed_tokens.device();
    let ids = CausalLm::<B>::ids_tensor(ids, &device);
    let inner = net.valid();
    let inner_pos = pos.inner();
    let mut inputs = Vec::with_capacity(net.layers.len());
    let mut x = net.neftune(inner.embed(ids.clone().inner()), seed);
    let coef = net.router_aux_loss_coef;
    let mut routing = (coef > 0.0).then(|| inner_pos.routing());
    for (l, layer) in inner.layers.iter().enumerate() {
        inputs.push(x.clone());
        CausalLm::<B::InnerBackend>::seed_layer(&device, seed, l);
        x = layer.forward(x, &inner_pos, None, true, routing.as_mut());
    }
    let aux_weights = routing.as_ref().and_then(|r| r.weights(coef));
    let aux = routing.and_then(|r| r.loss(coef));

    let top = Tensor::<B, 3>::from_inner(x).require_grad();
    let (loss, k) = net.loss_from_hidden(net.norm.forward(top.clone()), labels);
    if k == 0 {
        return None;
    }
    let scaled = loss.mul_scalar(k as f64 / total as f64);
    let g = scaled.backward();
    grads.accumulate(net, &g);
    let mut dy = top.grad(&g);
    // What the head's pass holds beyond `grads` goes before the layers run.
    drop(g);

    let embed_trains = net.embed_tokens.val().is_require_grad();
    // below[l]: whether anything under layer `l` trains, so that its input
    // needs a gradient; under the lowest trained weight nothing runs again.
    let trained: Vec<bool> = net.layers.iter().map(trains).collect();
    let mut below = vec![embed_trains; trained.len()];
    for l in 1..below.len() {
        below[l] = below[l - 1] || trained[l - 1];
    }
    for (l, layer) in net.layers.iter().enumerate().rev() {
        let Some(d) = dy.take() else { break };
        if !trained[l] && !below[l] {
            break;
        }
        let x = Tensor::<B, 3>::from_inner(inputs.pop().expect("one input per layer"));
        let x = if below[l] { x.require_grad() } else { x };
        CausalLm::<B>::seed_layer(&device, seed, l);
        let mut routing = aux_weights.as_ref().map(|_| pos.routing());
        let y = layer.forward(x.clone(), pos, None, true, routing.as_mut());
        let aux = routing.zip(aux_weights.as_deref());
        let g = vjp(y, d, aux.and_then(|(r, w)| r.layer_loss(w)));
        grads.accumulate(net, &g);
        dy = if below[l] { x.grad(&g) } else { None };
    }
    if let (true, Some(d)) = (embed_trains, dy) {
        let g = vjp(net.embed(ids), d, None);
        grads.accumulate(net, &g);
    }
    let scaled = scaled.inner();
    Some((aux.map_or(scaled.clone(), |aux| scaled + aux), k))
}

/// Whether a parameter of `layer` is trained.
fn trains<B: AutodiffBackend>(layer: &DecoderLayer<B>) -> bool {
    struct Any(bool);
    impl<B: AutodiffBackend> ModuleVisitor<B> for Any {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            self.0 |= param.val().is_require_grad();
        }
    }
    let mut any = Any(false);
    layer.visit(&mut any);
    any.0
}

/// The backward pass of `y` with `dy` as its gradient: that of
/// `sum(y * dy)`, whose gradient with respect to `y` is `dy` exactly, plus
/// `extra`'s (a loss computed in the same pass).
fn vjp<B: AutodiffBackend>(
    y: Tensor<B, 3>,
    dy: Tensor<B::InnerBackend, 3>,
    extra: Option<Tensor<B, 1>>,
) -> B::Gradients {
    let dot = (y * Tensor::from_inner(dy)).sum();
    match extra {
        Some(extra) => (dot + extra).backward(),
        None => dot.backward(),
    }
}
