//! One micro-batch's loss and adapter gradients, with or without activation recomputation.
//!
//! Full backpropagation records one autograd graph over every block and keeps all of it (every
//! norm, rotary, softmax and MLP intermediate of every layer) until the backward pass; that graph
//! is most of a healing run's memory. With recomputation ([`HealConfig::recompute`], the
//! default) a micro-batch runs in three stages:
//!
//! 1. forward through the blocks one at a time, keeping only each block's input `x^(l)` and
//!    dropping the block's graph as soon as its output is taken (detached);
//! 2. the loss from `x^(L')` as a tracked leaf: backward gives `∂L/∂x^(L')`;
//! 3. for `l = L'-1 .. 0`: recompute block `l` from `x^(l)` with its graph, and backpropagate
//!    the surrogate `Σ out · ∂L/∂out`, which gives the block's adapter gradients and
//!    `∂L/∂x^(l)` for the block below; then drop the graph.
//!
//! Memory is then one block's graph plus the `L'` block inputs instead of `L'` graphs. Both
//! passes over a block run the same ops on the same values (the inputs are tracked exactly when
//! full backpropagation would track them, so the same kernels are chosen, and every dropout mask
//! is a function of the seed set by [`Decoder::set_adapter_training`]), so the gradients equal
//! full backpropagation's up to the order in which a residual state's gradient contributions
//! are summed.
//!
//! [`HealConfig::recompute`]: super::HealConfig::recompute

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

use super::loss::{loss_from_hidden, next_token_loss};
use super::HealError;
use crate::model::{Decoder, Model};

/// Adds one micro-batch's adapter gradients, of `loss / loss_divisor`, to `sums` (one per entry
/// of `vars`, in that order) and returns the micro-batch's mean loss. A loss that is not finite
/// is returned without a backward pass, leaving `sums` as they were.
///
/// The adapters must be in training mode ([`Decoder::set_adapter_training`]) for the whole
/// call: recomputation runs every block again in the backward pass, with the same dropout masks.
pub fn accumulate_gradients(
    model: &Model,
    ids: &Tensor,
    recompute: bool,
    loss_divisor: f64,
    vars: &[Var],
    sums: &mut [Tensor],
) -> Result<f64, HealError> {
    if recompute {
        let pass = RecomputedPass::forward(&model.decoder, ids)?;
        let value = scalar(&pass.loss)?;
        if value.is_finite() {
            pass.backward(loss_divisor, vars, sums)?;
        }
        Ok(value)
    } else {
        let loss = next_token_loss(model, ids)?;
        let value = scalar(&loss)?;
        if value.is_finite() {
            let grads = (loss / loss_divisor)?.backward()?;
            add_gradients(&grads, vars, sums)?;
        }
        Ok(value)
    }
}

fn scalar(loss: &Tensor) -> candle_core::Result<f64> {
    loss.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()
}

/// Adds each var's gradient in `grads`, when it has one, to its running sum.
fn add_gradients(grads: &GradStore, vars: &[Var], sums: &mut [Tensor]) -> candle_core::Result<()> {
    for (sum, var) in sums.iter_mut().zip(vars) {
        if let Some(g) = grads.get(var.as_tensor()) {
            *sum = (&*sum + g)?;
        }
    }
    Ok(())
}

/// A block's input as the forward pass kept it.
enum BlockInput {
    /// A leaf that autograd tracks: a block above it has adapters, so its gradient is needed.
    Tracked(Var),
    /// No block below has an adapter (at least the embedding): nothing flows back through it.
    Plain(Tensor),
}

impl BlockInput {
    fn tensor(&self) -> &Tensor {
        match self {
            BlockInput::Tracked(v) => v.as_tensor(),
            BlockInput::Plain(t) => t,
        }
    }
}

/// Stage 1 and 2's result: the block inputs, the loss and its graph from `x^(L')`.
struct RecomputedPass<'d> {
    decoder: &'d Decoder,
    context: crate::model::decoder::BlockContext,
    inputs: Vec<BlockInput>,
    head_input: Var,
    loss: Tensor,
}

impl<'d> RecomputedPass<'d> {
    /// Runs the blocks keeping only their inputs, then the loss with its graph.
    fn forward(decoder: &'d Decoder, ids: &Tensor) -> candle_core::Result<Self> {
        let (_, t) = ids.dims2()?;
        let context = decoder.block_context(t)?;
        let mut x = decoder.embed(ids)?;
        let mut inputs = Vec::with_capacity(decoder.num_blocks());
        // Full backpropagation tracks x^(l) once a block below l has an adapter; tracking the
        // same states here makes every block choose the same kernels in both modes.
        let mut tracked = false;
        for l in 0..decoder.num_blocks() {
            let input = if tracked { BlockInput::Tracked(Var::from_tensor(&x)?) } else { BlockInput::Plain(x) };
            x = decoder.forward_block(l, input.tensor(), &context)?.detach();
            inputs.push(input);
            tracked |= decoder.block_has_adapter(l);
        }
        let head_input = Var::from_tensor(&x)?;
        let loss = loss_from_hidden(decoder, head_input.as_tensor(), ids)?;
        Ok(RecomputedPass { decoder, context, inputs, head_input, loss })
    }

    /// Stage 2 and 3: the head's backward pass, then block by block from the top.
    fn backward(self, loss_divisor: f64, vars: &[Var], sums: &mut [Tensor]) -> candle_core::Result<()> {
        let RecomputedPass { decoder, context, inputs, head_input, loss } = self;
        let grads = (loss / loss_divisor)?.backward()?;
        let Some(mut upstream) = grads.get(head_input.as_tensor()).cloned() else {
            return Ok(()); // the head does not depend on the blocks: nothing to train
        };
        drop(grads);
        for (l, input) in inputs.iter().enumerate().rev() {
            let out = decoder.forward_block(l, input.tensor(), &context)?;
            if !out.track_op() {
                break; // neither this block nor any below has an adapter
            }
            let grads = (out * &upstream)?.sum_all()?.backward()?;
            add_gradients(&grads, vars, sums)?;
            match input {
                BlockInput::Tracked(var) => match grads.get(var.as_tensor()) {
                    Some(g) => upstream = g.clone(),
                    None => break,
                },
                BlockInput::Plain(_) => break,
            }
        }
        Ok(())
    }
}
