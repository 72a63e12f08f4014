//! How one pass lays its tokens out: sequences end to end in one row (no padding), each either a
//! sequence of its own or the continuation of an earlier one (a cloze question's four answers
//! after its context), all after an optional shared prefix held in a [`super::KvCache`].
//!
//! Attention then runs span by span ([`Span`]): a span is a run of whole groups (a sequence and
//! its continuations) whose rows attend only to the prefix and to the span's own keys, so a pass
//! of N documents costs N small `[len, P + len]` score matrices, not one `[T, P + T]` matrix that
//! is almost all mask. Small groups share a span (one matrix for several short sequences costs
//! less than one call each); a group never crosses spans.

use candle_core::{Device, Tensor};

/// Groups are merged into one span while it stays within this many tokens; a longer group is a
/// span of its own. At 256 the cross-group scores a merged span computes and masks are at most
/// a quarter of its `256²`, while a span costs a dozen tensor ops per block.
pub const SPAN_TOKENS: usize = 256;

/// One sequence of a packed pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Segment {
    /// Its tokens.
    pub len: usize,
    /// The earlier segment it continues: it sees that segment's tokens, and its positions follow
    /// them. `None` for a sequence of its own.
    pub continues: Option<usize>,
}

/// The sequences of one pass, end to end. A continuation comes after the sequence it continues
/// and after that sequence's earlier continuations: a group (a sequence and its continuations)
/// is contiguous. The prefix the pass continues, if any, is the caller's (its length is passed
/// to [`Packing::positions`] and [`Packing::spans`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packing {
    segments: Vec<Segment>,
}

/// Rows `start .. start + len` of a pass whose attention is computed together, with its additive
/// mask `[len, P + len]` (columns: the prefix, then the span's own tokens). Row `i` never sees a
/// key past `P + i`; attention relies on it to skip those keys.
#[derive(Debug, Clone)]
pub struct Span {
    /// First row.
    pub start: usize,
    /// Rows.
    pub len: usize,
    /// `0` where a row sees a key, `-inf` elsewhere.
    pub mask: Tensor,
}

impl Packing {
    /// One sequence of `len` tokens: the plain causal pass.
    pub fn single(len: usize) -> Self {
        Packing { segments: vec![Segment { len, continues: None }] }
    }

    /// Independent sequences of `lengths` tokens.
    pub fn sequences(lengths: &[usize]) -> Self {
        Packing { segments: lengths.iter().map(|&len| Segment { len, continues: None }).collect() }
    }

    /// `segments`, checked: a continuation names an earlier sequence of its own (not another
    /// continuation) and follows its group without a gap.
    pub fn new(segments: Vec<Segment>) -> candle_core::Result<Self> {
        let mut group_root = None;
        for (i, s) in segments.iter().enumerate() {
            match s.continues {
                None => group_root = Some(i),
                Some(r) if Some(r) == group_root => {}
                Some(r) => candle_core::bail!(
                    "packed segment {i} continues segment {r}, which is not the sequence right before its group \
                     (a continuation follows the sequence it continues and that sequence's other continuations)"
                ),
            }
            if s.len == 0 {
                candle_core::bail!("packed segment {i} is empty");
            }
        }
        Ok(Packing { segments })
    }

    /// Tokens in the row (the prefix not counted).
    pub fn len(&self) -> usize {
        self.segments.iter().map(|s| s.len).sum()
    }

    /// Whether the row holds no token.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The segments, in row order.
    pub fn segments(&self) -> &[Segment] {
        &self.segments
    }

    /// Each row's position after `prefix` cached tokens: a sequence counts on from the prefix, a
    /// continuation from the end of the sequence it continues.
    pub fn positions(&self, prefix: usize) -> Vec<usize> {
        let mut out = Vec::with_capacity(self.len());
        for s in &self.segments {
            let first = prefix + s.continues.map_or(0, |r| self.segments[r].len);
            out.extend(first..first + s.len);
        }
        out
    }

    /// The spans attention runs after `prefix` cached tokens: whole groups, merged while a span
    /// stays within [`SPAN_TOKENS`]. `window`: keys at least this many positions back are hidden
    /// (sliding-window attention).
    pub fn spans(&self, prefix: usize, window: Option<usize>, device: &Device) -> candle_core::Result<Vec<Span>> {
        // Groups as segment ranges, then runs of groups as spans.
        let mut groups: Vec<std::ops::Range<usize>> = Vec::new();
        for (i, s) in self.segments.iter().enumerate() {
            match (s.continues, groups.last_mut()) {
                (Some(_), Some(g)) => g.end = i + 1,
                _ => groups.push(i..i + 1),
            }
        }
        let tokens = |g: &std::ops::Range<usize>| self.segments[g.clone()].iter().map(|s| s.len).sum::<usize>();
        let mut spans = Vec::new();
        let (mut start, mut first, mut len) = (0, 0, 0);
        for (gi, g) in groups.iter().enumerate() {
            let n = tokens(g);
            if gi > first && len + n > SPAN_TOKENS {
                spans.push(self.span(start, len, groups[first].start..groups[gi - 1].end, prefix, window, device)?);
                (start, first, len) = (start + len, gi, 0);
            }
            len += n;
        }
        if let Some(last) = groups.last() {
            spans.push(self.span(start, len, groups[first].start..last.end, prefix, window, device)?);
        }
        Ok(spans)
    }

    /// The span over `segments` (rows `start .. start + len`) and its mask.
    fn span(
        &self,
        start: usize,
        len: usize,
        segments: std::ops::Range<usize>,
        p: usize,
        window: Option<usize>,
        device: &Device,
    ) -> candle_core::Result<Span> {
        let width = p + len;
        let mut mask = vec![f32::NEG_INFINITY; len * width];
        // Where each segment starts within the span, to find a continuation's sequence.
        let mut offsets = vec![0; self.segments.len()];
        let mut at = 0;
        for i in segments {
            let s = self.segments[i];
            offsets[i] = at;
            // The keys this segment sees besides itself: the sequence it continues (all of it).
            let (parent_at, parent_len) = s.continues.map_or((0, 0), |r| (offsets[r], self.segments[r].len));
            let first_pos = p + parent_len;
            for k in 0..s.len {
                let (row, qpos) = ((at + k) * width, first_pos + k);
                let near = |kpos: usize| window.is_none_or(|w| qpos - kpos < w);
                for j in (0..p).filter(|&j| near(j)) {
                    mask[row + j] = 0.0;
                }
                for j in (0..parent_len).filter(|&j| near(p + j)) {
                    mask[row + p + parent_at + j] = 0.0;
                }
                for j in (0..=k).filter(|&j| near(first_pos + j)) {
                    mask[row + p + at + j] = 0.0;
                }
            }
            at += s.len;
        }
        Ok(Span { start, len, mask: Tensor::from_vec(mask, (len, width), device)? })
    }
}

/// The `[T, P + T]` mask of one sequence of `t` tokens after `p` cached ones (causal, with an
/// optional window): the plain pass's only span.
pub fn causal_mask(t: usize, p: usize, window: Option<usize>, device: &Device) -> candle_core::Result<Tensor> {
    Ok(Packing::single(t).spans(p, window, device)?.remove(0).mask)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn visible(m: &Tensor) -> Vec<Vec<bool>> {
        m.to_vec2::<f32>().unwrap().iter().map(|r| r.iter().map(|v| *v == 0.0).collect()).collect()
    }

    const CPU: Device = Device::Cpu;

    #[test]
    fn mask_is_causal_with_prefix_and_window() {
        let m = causal_mask(2, 3, None, &CPU).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(m[0], vec![0.0, 0.0, 0.0, 0.0, f32::NEG_INFINITY]);
        assert_eq!(m[1], vec![0.0; 5]);
        let v = visible(&causal_mask(4, 0, Some(2), &CPU).unwrap());
        assert_eq!(v[3], vec![false, false, true, true]);
        assert_eq!(v[1], vec![true, true, false, false]);
    }

    #[test]
    fn short_sequences_share_a_span_and_see_only_the_prefix_and_themselves() {
        // Prefix of 2, then sequences of 2 and 3 tokens: one span of 5 rows.
        let spans = Packing::sequences(&[2, 3]).spans(2, None, &CPU).unwrap();
        assert_eq!(spans.len(), 1);
        let v = visible(&spans[0].mask);
        let (t, f) = (true, false);
        assert_eq!(v[0], vec![t, t, t, f, f, f, f]);
        assert_eq!(v[1], vec![t, t, t, t, f, f, f]);
        assert_eq!(v[2], vec![t, t, f, f, t, f, f], "the second sequence does not see the first");
        assert_eq!(v[4], vec![t, t, f, f, t, t, t]);
        // A window of 2 counts positions within each sequence's own stream (prefix + itself).
        let v = visible(&Packing::sequences(&[2, 3]).spans(2, Some(2), &CPU).unwrap()[0].mask);
        assert_eq!(v[2], vec![f, t, f, f, t, f, f]);
        assert_eq!(v[4], vec![f, f, f, f, f, t, t]);
        assert_eq!(Packing::sequences(&[2, 3]).positions(2), vec![2, 3, 2, 3, 4]);
    }

    #[test]
    fn long_sequences_get_a_span_each() {
        let packing = Packing::sequences(&[200, 100, 50, 256, 1]);
        let spans = packing.spans(0, None, &CPU).unwrap();
        let rows: Vec<(usize, usize)> = spans.iter().map(|s| (s.start, s.len)).collect();
        assert_eq!(rows, vec![(0, 200), (200, 150), (350, 256), (606, 1)]);
        for s in &spans {
            assert_eq!(s.mask.dims(), &[s.len, s.len]);
        }
    }

    #[test]
    fn a_continuation_sees_its_sequence_and_follows_its_positions() {
        // A context of 3 tokens with two answers of 2 and 1 tokens, then a sequence of 2.
        let seg = |len, continues| Segment { len, continues };
        let packing = Packing::new(vec![seg(3, None), seg(2, Some(0)), seg(1, Some(0)), seg(2, None)]).unwrap();
        assert_eq!(packing.positions(1), vec![1, 2, 3, 4, 5, 4, 1, 2]);
        let spans = packing.spans(1, None, &CPU).unwrap();
        assert_eq!(spans.len(), 1);
        let v = visible(&spans[0].mask);
        let (t, f) = (true, false);
        //             P  c  c  c  a  a  b  s  s
        assert_eq!(v[2], vec![t, t, t, t, f, f, f, f, f], "the context is causal");
        assert_eq!(v[4], vec![t, t, t, t, t, t, f, f, f], "the first answer sees the context and itself");
        assert_eq!(v[5], vec![t, t, t, t, f, f, t, f, f], "the second answer does not see the first");
        assert_eq!(v[7], vec![t, f, f, f, f, f, f, t, t], "the next sequence sees only the prefix and itself");
        // With a window of 2, the first answer's second token (position 5) sees positions 4 and 5.
        let v = visible(&packing.spans(1, Some(2), &CPU).unwrap()[0].mask);
        assert_eq!(v[4], vec![f, f, f, f, t, t, f, f, f]);
    }

    #[test]
    fn continuations_must_follow_their_group() {
        let seg = |len, continues| Segment { len, continues };
        assert!(Packing::new(vec![seg(2, None), seg(1, Some(0)), seg(1, Some(0))]).is_ok());
        let e = Packing::new(vec![seg(2, None), seg(1, None), seg(1, Some(0))]).unwrap_err().to_string();
        assert!(e.contains("segment 2 continues segment 0"), "{e}");
        assert!(Packing::new(vec![seg(2, None), seg(1, Some(1))]).is_err(), "a continuation of a continuation");
        assert!(Packing::new(vec![seg(0, None)]).is_err());
    }
}
