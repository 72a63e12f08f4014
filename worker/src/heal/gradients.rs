//! One micro-batch's loss and adapter gradients, with any number of decoder blocks recomputed in
//! the backward pass instead of keeping their activations.
//!
//! Full backpropagation records one autograd graph over every block and keeps all of it (every
//! norm, rotary, softmax and MLP intermediate of every layer) until the backward pass; that graph
//! is most of a healing run's memory. With recomputation the blocks below a split `s` (all of
//! them by [`Recompute::ALL`], none by [`Recompute::NONE`]) do not keep theirs, and a micro-batch
//! runs in three stages:
//!
//! 1. forward through blocks `0 .. s` one at a time, keeping only each block's input `x^(l)` and
//!    dropping the block's graph as soon as its output is taken (detached);
//! 2. from `x^(s)` (a tracked leaf) through the top blocks `s .. L'` with their graphs, and the
//!    loss: backward gives the top blocks' adapter gradients and `∂L/∂x^(s)`;
//! 3. for `l = s-1 .. 0`: recompute block `l` from `x^(l)` with its graph, and backpropagate
//!    the surrogate `Σ out · ∂L/∂out`, which gives the block's adapter gradients and
//!    `∂L/∂x^(l)` for the block below; then drop the graph.
//!
//! Memory is then the `L' - s` top graphs (or one block's graph) plus the `s` block inputs
//! instead of `L'` graphs, for `s` more block forward passes. Both passes over a block run the
//! same ops on the same values (the inputs are tracked exactly when full backpropagation would
//! track them, so the same kernels are chosen, and every dropout mask is a function of the seed
//! set by [`Decoder::set_adapter_training`]), so the gradients equal full backpropagation's up to
//! the order in which a residual state's gradient contributions are summed.
//!
//! [`Recompute::Fit`], the default, keeps as many top graphs as the free memory holds:
//! [`graphs_that_fit`].

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use prunesweep_proto::memory::{MemoryError, Training};

use super::loss::loss_from_hidden;
use super::{HealConfig, HealError, Recompute};
use crate::model::{Decoder, Model};

/// Adds one micro-batch's adapter gradients, of `loss / loss_divisor`, to `sums` (one per entry
/// of `vars`, in that order) and returns the micro-batch's mean loss; the top `kept_graphs`
/// blocks keep their graphs and the others are recomputed in the backward pass (`usize::MAX`:
/// full backpropagation). A loss that is not finite is returned without a backward pass, leaving
/// `sums` as they were.
///
/// The adapters must be in training mode ([`Decoder::set_adapter_training`]) for the whole
/// call: recomputation runs blocks again in the backward pass, with the same dropout masks.
pub fn accumulate_gradients(
    model: &Model,
    ids: &Tensor,
    kept_graphs: usize,
    loss_divisor: f64,
    vars: &[Var],
    sums: &mut [Tensor],
) -> Result<f64, HealError> {
    let pass = RecomputedPass::forward(&model.decoder, ids, kept_graphs)?;
    let value = scalar(&pass.loss)?;
    if value.is_finite() {
        pass.backward(loss_divisor, vars, sums)?;
    }
    Ok(value)
}

/// How many of `decoder`'s blocks, from the top, keep their graphs under `recompute` in a run of
/// `cfg` (adapters on `modules`): [`Recompute::Top`]'s number, or for [`Recompute::Fit`] as many
/// as 90% of `free` (the device's free memory now, the model, adapters and moments already in
/// it) holds beyond what a micro-batch takes with every block recomputed, per the memory model
/// ([`Training`]). With `free` unknown, or a shape the memory model cannot count, none.
pub fn graphs_that_fit(decoder: &Decoder, cfg: &HealConfig, modules: &[String], free: Option<u64>) -> usize {
    let blocks = decoder.num_blocks();
    match cfg.recompute {
        Recompute::Top(n) => n.min(blocks),
        Recompute::Fit => {
            let Some(free) = free else { return 0 };
            match training(decoder, cfg, modules) {
                Ok(training) => {
                    let blocks = blocks as u64;
                    let spare = (free / 10 * 9).saturating_sub(training.least_step_bytes(blocks));
                    training.graphs_that_fit(blocks, spare) as usize
                }
                Err(e) => {
                    tracing::warn!(error = %e, "recomputing every block: the memory model cannot size the graphs");
                    0
                }
            }
        }
    }
}

/// The memory model's view of one micro-batch of `cfg` on `decoder`.
fn training(decoder: &Decoder, cfg: &HealConfig, modules: &[String]) -> Result<Training, MemoryError> {
    let placement = crate::device::placement(decoder.device());
    let sizes = (cfg.micro_batch as u64, cfg.seq_len as u64, cfg.rank as u64);
    Training::with_modules(&decoder.cfg.shape(), sizes, modules, decoder.dtype().size_in_bytes() as u64, placement)
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

/// Stage 1 and 2's result: the recomputed blocks' inputs, the top blocks' input (a tracked
/// leaf) and the loss with the top blocks' graphs.
struct RecomputedPass<'d> {
    decoder: &'d Decoder,
    context: crate::model::decoder::BlockContext,
    inputs: Vec<BlockInput>,
    top_input: BlockInput,
    loss: Tensor,
}

impl<'d> RecomputedPass<'d> {
    /// Runs the blocks below the split keeping only their inputs, then the top `kept_graphs`
    /// blocks and the loss with their graphs.
    fn forward(decoder: &'d Decoder, ids: &Tensor, kept_graphs: usize) -> candle_core::Result<Self> {
        let (_, t) = ids.dims2()?;
        let blocks = decoder.num_blocks();
        let split = blocks - kept_graphs.min(blocks);
        let context = decoder.block_context(t)?;
        let mut x = decoder.embed(ids)?;
        let mut inputs = Vec::with_capacity(split);
        // Full backpropagation tracks x^(l) once a block below l has an adapter; tracking the
        // same states here makes every block choose the same kernels in both modes.
        let mut tracked = false;
        for l in 0..split {
            let input = if tracked { BlockInput::Tracked(Var::from_tensor(&x)?) } else { BlockInput::Plain(x) };
            x = decoder.forward_block(l, input.tensor(), &context)?.detach();
            inputs.push(input);
            tracked |= decoder.block_has_adapter(l);
        }
        // The top blocks' input is where the gradient for the recomputed ones comes from: a
        // tracked leaf unless nothing below has an adapter (with no block recomputed, the
        // embedding, never tracked).
        let top_input = if split == blocks || (split > 0 && tracked) {
            BlockInput::Tracked(Var::from_tensor(&x)?)
        } else {
            BlockInput::Plain(x)
        };
        let mut hidden = top_input.tensor().clone();
        for l in split..blocks {
            hidden = decoder.forward_block(l, &hidden, &context)?;
        }
        let loss = loss_from_hidden(decoder, &hidden, ids)?;
        Ok(RecomputedPass { decoder, context, inputs, top_input, loss })
    }

    /// Stage 2 and 3: the top blocks' and head's backward pass, then the recomputed blocks one by
    /// one from the top.
    fn backward(self, loss_divisor: f64, vars: &[Var], sums: &mut [Tensor]) -> candle_core::Result<()> {
        let RecomputedPass { decoder, context, inputs, top_input, loss } = self;
        let grads = (loss / loss_divisor)?.backward()?;
        add_gradients(&grads, vars, sums)?;
        let BlockInput::Tracked(top) = top_input else { return Ok(()) };
        let Some(mut upstream) = grads.get(top.as_tensor()).cloned() else {
            return Ok(()); // the top does not depend on the blocks below: nothing more to train
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
