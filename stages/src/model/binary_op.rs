//! Recording a two-input op of our own on burn's autodiff graph: the forward
//! pass runs on the inner backend, both inputs are checkpointed as the
//! backward pass's state, and a [`BinaryGrad`] turns the output's gradient
//! into the inputs'. The projections' matmul, SwiGLU, GeGLU and the RMS norm are
//! such ops.

use burn::backend::Autodiff;
use burn::backend::autodiff::NodeId;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::tensor::ops::FloatTensor;

use super::backend::ModelBackend;

/// The backward pass of a two-input op.
pub(crate) trait BinaryGrad<B: ModelBackend>:
    Send + std::fmt::Debug + Sized + 'static
{
    /// The gradients of inputs `a` and `b` given the output's gradient
    /// `dout`; `want[i]` says whether input `i` needs one (others may be
    /// `None`).
    fn grads(
        self,
        a: FloatTensor<B>,
        b: FloatTensor<B>,
        dout: FloatTensor<B>,
        want: [bool; 2],
    ) -> [Option<FloatTensor<B>>; 2];
}

/// Records `out`, computed from `a` and `b` on the inner backend, with
/// `grad` as its backward pass.
pub(crate) fn record<B: ModelBackend, C: CheckpointStrategy, G: BinaryGrad<B>>(
    grad: G,
    a: &FloatTensor<Autodiff<B, C>>,
    b: &FloatTensor<Autodiff<B, C>>,
    out: FloatTensor<B>,
) -> FloatTensor<Autodiff<B, C>> {
    match Binary(grad)
        .prepare::<C>([a.node.clone(), b.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(mut prep) => {
            let state = (prep.checkpoint(a), prep.checkpoint(b));
            prep.finish(state, out)
        }
        OpsKind::UnTracked(prep) => prep.finish(out),
    }
}

#[derive(Debug)]
struct Binary<G>(G);

impl<B: ModelBackend, G: BinaryGrad<B>> Backward<B, 2> for Binary<G> {
    type State = (NodeId, NodeId);

    fn backward(
        self,
        ops: Ops<Self::State, 2>,
        grads: &mut Gradients,
        checkpointer: &mut Checkpointer,
    ) {
        let [node_a, node_b] = ops.parents;
        let dout = grads.consume::<B>(&ops.node);
        let (a, b) = ops.state;
        let a: FloatTensor<B> = checkpointer.retrieve_node_output(a);
        let b: FloatTensor<B> = checkpointer.retrieve_node_output(b);
        let want = [node_a.is_some(), node_b.is_some()];
        let [da, db] = self.0.grads(a, b, dout, want);
        for (node, d) in [(node_a, da), (node_b, db)] {
            if let (Some(node), Some(d)) = (node, d) {
                grads.register::<B>(node.id, d);
            }
        }
    }
}
