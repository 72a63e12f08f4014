//! Which layers to drop, and the pruned checkpoint.
//!
//! Three ways to choose `n` layers out of `L`:
//! - [`Method::Angular`] (Gromov et al. 2024, eq. 6): the block `l*(n) .. l*(n)+n−1` with the smallest
//!   mean angular distance `d(l, n)`; ties to the smallest `l`.
//! - [`Method::Deepest`] (their simple heuristic): the `n` layers just before the last one,
//!   0-based `L−n−1 ..= L−2`; the final layer is always kept.
//! - [`Method::BlockInfluence`] (ShortGPT): the `n` layers with the lowest Block Influence, not
//!   necessarily contiguous; ties to the smaller index.
//!
//! A fraction `f ∈ [0, 1)` of the layers means `n = round(f · L)` (half away from zero).

use serde::Serialize;

use prunesweep_proto::v1::PruneMethod;
use prunesweep_proto::Vocabulary;

use crate::model::{Decoder, ModelError};
use crate::score::{AngularDistances, BlockInfluence, ScoreError};

/// How the layers to drop are chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// Smallest angular distance between the block's input and output (the paper's method).
    Angular,
    /// The deepest layers except the last (the paper's heuristic; heal afterwards).
    Deepest,
    /// Lowest ShortGPT Block Influence, per layer.
    BlockInfluence,
}

impl Method {
    /// The name used on the command line and in files (the contract's, [`Vocabulary::name`]).
    pub fn name(self) -> String {
        PruneMethod::from(self).name()
    }

    /// Whether the method chooses by layer scores (a distance table or Block Influence).
    pub fn needs_scores(self) -> bool {
        self != Method::Deepest
    }
}

impl From<Method> for PruneMethod {
    fn from(m: Method) -> Self {
        match m {
            Method::Angular => PruneMethod::Angular,
            Method::Deepest => PruneMethod::Deepest,
            Method::BlockInfluence => PruneMethod::BlockInfluence,
        }
    }
}

impl TryFrom<PruneMethod> for Method {
    type Error = PruneError;
    fn try_from(m: PruneMethod) -> Result<Self, PruneError> {
        match m {
            PruneMethod::Angular => Ok(Method::Angular),
            PruneMethod::Deepest => Ok(Method::Deepest),
            PruneMethod::BlockInfluence => Ok(Method::BlockInfluence),
            PruneMethod::Unspecified => Err(PruneError::NoMethod),
        }
    }
}

/// How many layers to drop.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Amount {
    /// A share of the layers in [0, 1): `n = round(f · L)`.
    Fraction(f64),
    /// Exactly this many.
    N(usize),
}

/// The pruning stage's settings: how to choose, how many.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PruneSpec {
    /// How the layers are chosen.
    pub method: Method,
    /// How many.
    pub amount: Amount,
}

/// What a score-based method chooses by: the score job's tables, or a scoring pass's.
#[derive(Debug, Clone, Copy, Default)]
pub struct LayerScores<'a> {
    /// `d(l, n)` (angular).
    pub distances: Option<&'a AngularDistances>,
    /// Block Influence per layer (block-influence).
    pub influence: Option<&'a BlockInfluence>,
}

impl PruneSpec {
    /// The layers to drop from a model of `layers` blocks. Angular and block-influence need their
    /// table in `scores`, for exactly `layers` layers.
    pub fn plan(&self, layers: usize, scores: LayerScores) -> Result<PrunePlan, PruneError> {
        let n = match self.amount {
            Amount::Fraction(f) => layers_for_fraction(f, layers)?,
            Amount::N(n) => n,
        };
        let fits = |scored: usize| {
            if scored == layers {
                Ok(())
            } else {
                Err(PruneError::ScoresForOtherModel { scored, layers })
            }
        };
        match self.method {
            Method::Deepest => PrunePlan::deepest(layers, n),
            Method::Angular => {
                let d = scores.distances.ok_or(PruneError::NoScores(Method::Angular))?;
                fits(d.num_layers)?;
                PrunePlan::angular(d, n)
            }
            Method::BlockInfluence => {
                let bi = scores.influence.ok_or(PruneError::NoScores(Method::BlockInfluence))?;
                fits(bi.scores.len())?;
                PrunePlan::block_influence(bi, n)
            }
        }
    }
}

/// The pruning stage, as `worker prune` and a sweep's cells run it: removes the plan's layers (it
/// indexes the blocks the model has now) and returns their checkpoint indices.
pub fn run(decoder: &mut Decoder, plan: &PrunePlan) -> Result<Vec<usize>, ModelError> {
    let kept = decoder.kept_layers();
    let dropped: Vec<usize> = plan.dropped.iter().map(|&i| kept[i]).collect();
    decoder.remove_layers(&dropped)?;
    Ok(dropped)
}

/// Why a pruning request is impossible.
#[derive(Debug, thiserror::Error)]
pub enum PruneError {
    /// Fraction outside `[0, 1)`.
    #[error("fraction {0} is outside [0, 1): it is the share of layers to drop, e.g. 0.25")]
    Fraction(f64),
    /// `n` would leave no layer.
    #[error("cannot drop {n} of {layers} layers: n must be below L (at least one layer stays)")]
    TooMany {
        /// Layers requested.
        n: usize,
        /// Layers in the model.
        layers: usize,
    },
    /// An explicit block that runs past the last layer.
    #[error("block {start}:{n} (layers {start}..{start}+{n}-1) runs past the last layer {last}")]
    PastEnd {
        /// First layer.
        start: usize,
        /// Layers in the block.
        n: usize,
        /// Index of the last layer.
        last: usize,
    },
    /// The scores do not fit the model.
    #[error(transparent)]
    Score(#[from] ScoreError),
    /// No method was given (a job spec with the method unset).
    #[error("no prune method given; use one of angular, deepest, block-influence")]
    NoMethod,
    /// A score-based method without its scores.
    #[error("method {} needs layer scores (a distances table), and none were given", .0.name())]
    NoScores(Method),
    /// Scores for a model of another depth.
    #[error("the layer scores are for {scored} layers, the model has {layers}")]
    ScoresForOtherModel {
        /// Layers the scores cover.
        scored: usize,
        /// Layers in the model.
        layers: usize,
    },
}

/// `n = round(f · L)` for `f ∈ [0, 1)`.
pub fn layers_for_fraction(fraction: f64, layers: usize) -> Result<usize, PruneError> {
    if !(0.0..1.0).contains(&fraction) || fraction.is_nan() {
        return Err(PruneError::Fraction(fraction));
    }
    let n = (fraction * layers as f64).round() as usize;
    check_n(n, layers)?;
    Ok(n)
}

fn check_n(n: usize, layers: usize) -> Result<(), PruneError> {
    if n >= layers {
        return Err(PruneError::TooMany { n, layers });
    }
    Ok(())
}

/// The layers chosen for removal and why.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PrunePlan {
    /// How they were chosen (`None` for an explicit `--layers START:N`).
    pub method: Option<Method>,
    /// Number of layers dropped.
    pub n: usize,
    /// Layers in the model before the cut.
    pub num_layers: usize,
    /// Original 0-based indices of the dropped layers, ascending.
    pub dropped: Vec<usize>,
    /// `d(l*, n)` for `angular`; the summed Block Influence of the dropped layers for
    /// `block-influence`; absent otherwise.
    pub score: Option<f64>,
}

impl PrunePlan {
    /// An explicit block `start .. start + n`.
    pub fn explicit(start: usize, n: usize, layers: usize) -> Result<Self, PruneError> {
        check_n(n, layers)?;
        if start.checked_add(n).is_none_or(|end| end > layers) {
            return Err(PruneError::PastEnd { start, n, last: layers - 1 });
        }
        Ok(PrunePlan { method: None, n, num_layers: layers, dropped: (start..start + n).collect(), score: None })
    }

    /// The block with the smallest mean angular distance.
    pub fn angular(distances: &AngularDistances, n: usize) -> Result<Self, PruneError> {
        let layers = distances.num_layers;
        check_n(n, layers)?;
        if n == 0 {
            return Ok(PrunePlan {
                method: Some(Method::Angular),
                n,
                num_layers: layers,
                dropped: vec![],
                score: None,
            });
        }
        let (start, d) = distances.best_start(n)?;
        Ok(PrunePlan {
            method: Some(Method::Angular),
            n,
            num_layers: layers,
            dropped: (start..start + n).collect(),
            score: Some(d),
        })
    }

    /// The `n` layers before the last: `L−n−1 ..= L−2`.
    pub fn deepest(layers: usize, n: usize) -> Result<Self, PruneError> {
        check_n(n, layers)?;
        let dropped = if n == 0 { vec![] } else { (layers - n - 1..layers - 1).collect() };
        Ok(PrunePlan { method: Some(Method::Deepest), n, num_layers: layers, dropped, score: None })
    }

    /// The `n` layers of lowest Block Influence.
    pub fn block_influence(influence: &BlockInfluence, n: usize) -> Result<Self, PruneError> {
        let layers = influence.scores.len();
        check_n(n, layers)?;
        let mut order: Vec<usize> = (0..layers).collect();
        order.sort_by(|&a, &b| influence.scores[a].total_cmp(&influence.scores[b]).then(a.cmp(&b)));
        let mut dropped: Vec<usize> = order.into_iter().take(n).collect();
        dropped.sort_unstable();
        let score = dropped.iter().map(|&l| influence.scores[l]).sum();
        Ok(PrunePlan {
            method: Some(Method::BlockInfluence),
            n,
            num_layers: layers,
            dropped,
            score: (n > 0).then_some(score),
        })
    }

    /// Layers kept, ascending.
    pub fn kept(&self) -> Vec<usize> {
        (0..self.num_layers).filter(|l| !self.dropped.contains(l)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fraction_maps_to_rounded_n() {
        assert_eq!(layers_for_fraction(0.0, 30).unwrap(), 0);
        assert_eq!(layers_for_fraction(0.25, 30).unwrap(), 8, "7.5 rounds away from zero");
        assert_eq!(layers_for_fraction(0.2, 30).unwrap(), 6);
        assert!(matches!(layers_for_fraction(1.0, 30), Err(PruneError::Fraction(_))));
        assert!(matches!(layers_for_fraction(-0.1, 30), Err(PruneError::Fraction(_))));
        assert!(matches!(layers_for_fraction(0.99, 30), Err(PruneError::TooMany { n: 30, .. })));
    }

    #[test]
    fn deepest_keeps_the_last_layer() {
        let p = PrunePlan::deepest(30, 6).unwrap();
        assert_eq!(p.dropped, vec![23, 24, 25, 26, 27, 28]);
        assert_eq!(PrunePlan::deepest(4, 3).unwrap().dropped, vec![0, 1, 2]);
        assert!(PrunePlan::deepest(4, 4).is_err());
        assert!(PrunePlan::deepest(4, 0).unwrap().dropped.is_empty());
    }

    #[test]
    fn block_influence_takes_the_lowest_layers_anywhere() {
        let bi = BlockInfluence { scores: vec![0.9, 0.1, 0.5, 0.1, 0.2] };
        let p = PrunePlan::block_influence(&bi, 3).unwrap();
        assert_eq!(p.dropped, vec![1, 3, 4]);
        assert!((p.score.unwrap() - 0.4).abs() < 1e-12);
        assert_eq!(p.kept(), vec![0, 2]);
    }

    #[test]
    fn explicit_blocks_are_bounds_checked() {
        assert_eq!(PrunePlan::explicit(2, 3, 10).unwrap().dropped, vec![2, 3, 4]);
        assert!(PrunePlan::explicit(8, 3, 10).is_err());
        assert!(PrunePlan::explicit(0, 10, 10).is_err());
    }
}
