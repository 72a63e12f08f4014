//! The contract's enums as words: the names sweep files, exports, plots and the command line use.
//!
//! Each enum is written once, in the `.proto`; its names here are derived from prost's
//! `as_str_name` (`PRUNE_METHOD_BLOCK_INFLUENCE` → `block-influence`), so adding a value to the
//! contract adds its name everywhere, and no program keeps a second list of the values.

use crate::v1::{
    AdapterTargets, DistanceMetric, Dtype, EvalTaskKind, JobKind, JobState, LrSchedule, PruneMethod, SweepState,
};

/// A contract enum with names. Every value but `UNSPECIFIED` has one.
pub trait Vocabulary: Sized + Copy + 'static {
    /// The enum's prefix in the `.proto` (`PRUNE_METHOD_`).
    const PREFIX: &'static str;
    /// What the enum names, for error messages (`prune method`).
    const WHAT: &'static str;

    /// prost's `as_str_name`.
    fn proto_name(self) -> &'static str;
    /// The value of a wire number, if it is one.
    fn from_number(n: i32) -> Option<Self>;

    /// Every named value, in the `.proto`'s order (the values are numbered 1, 2, … there).
    fn all() -> Vec<Self> {
        (1..).map_while(Self::from_number).collect()
    }

    /// The kebab-case name (`block-influence`); `unspecified` for the unset value.
    fn name(self) -> String {
        let full = self.proto_name();
        full.strip_prefix(Self::PREFIX).unwrap_or(full).to_ascii_lowercase().replace('_', "-")
    }

    /// The snake_case name (`block_influence`), for stored columns that have always used it.
    fn snake_name(self) -> String {
        self.name().replace('-', "_")
    }

    /// The value named `name` (kebab or snake case); never `UNSPECIFIED`.
    fn from_name(name: &str) -> Option<Self> {
        Self::all().into_iter().find(|v| v.name() == name || v.snake_name() == name)
    }

    /// `name`'s value, or an error that lists the names there are.
    fn parse_name(name: &str) -> Result<Self, UnknownName> {
        Self::from_name(name).ok_or_else(|| UnknownName {
            what: Self::WHAT,
            given: name.to_string(),
            known: Self::all().into_iter().map(Self::name).collect::<Vec<_>>().join(", "),
        })
    }
}

/// A name that is not one of an enum's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownName {
    /// What was being named.
    pub what: &'static str,
    /// The name given.
    pub given: String,
    /// The names there are, comma-separated.
    pub known: String,
}

impl std::fmt::Display for UnknownName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "unknown {} {:?}; known: {}", self.what, self.given, self.known)
    }
}

impl std::error::Error for UnknownName {}

macro_rules! vocabulary {
    ($($ty:ty => $prefix:literal, $what:literal;)*) => {$(
        impl Vocabulary for $ty {
            const PREFIX: &'static str = $prefix;
            const WHAT: &'static str = $what;
            fn proto_name(self) -> &'static str {
                self.as_str_name()
            }
            fn from_number(n: i32) -> Option<Self> {
                Self::try_from(n).ok()
            }
        }
    )*};
}

vocabulary! {
    JobKind => "JOB_KIND_", "job kind";
    JobState => "JOB_STATE_", "job state";
    PruneMethod => "PRUNE_METHOD_", "prune method";
    EvalTaskKind => "EVAL_TASK_KIND_", "eval task";
    DistanceMetric => "DISTANCE_METRIC_", "distance metric";
    SweepState => "SWEEP_STATE_", "sweep state";
    AdapterTargets => "ADAPTER_TARGETS_", "adapter target set";
    LrSchedule => "LR_SCHEDULE_", "learning-rate schedule";
    Dtype => "DTYPE_", "dtype";
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_come_from_the_proto() {
        assert_eq!(PruneMethod::BlockInfluence.name(), "block-influence");
        assert_eq!(EvalTaskKind::MmluCloze.name(), "mmlu-cloze");
        assert_eq!(EvalTaskKind::C4Loss.name(), "c4-loss");
        assert_eq!(DistanceMetric::BlockInfluence.snake_name(), "block_influence");
        assert_eq!(AdapterTargets::AllLinear.name(), "all-linear");
        assert_eq!(PruneMethod::all(), [PruneMethod::Angular, PruneMethod::Deepest, PruneMethod::BlockInfluence]);
        assert_eq!(JobState::all().len(), 6);
    }

    #[test]
    fn names_round_trip_and_unknown_names_list_the_known() {
        for m in EvalTaskKind::all() {
            assert_eq!(EvalTaskKind::from_name(&m.name()), Some(m));
            assert_eq!(EvalTaskKind::from_name(&m.snake_name()), Some(m));
        }
        assert_eq!(PruneMethod::from_name("unspecified"), None);
        let e = PruneMethod::parse_name("shallowest").unwrap_err().to_string();
        assert_eq!(e, "unknown prune method \"shallowest\"; known: angular, deepest, block-influence");
    }

    fn serde_names_agree<T: Vocabulary + serde::Serialize>() {
        for v in T::all() {
            assert_eq!(serde_json::to_value(v).unwrap(), serde_json::Value::String(v.name()));
        }
    }

    #[test]
    fn serde_names_are_the_vocabulary_names() {
        serde_names_agree::<PruneMethod>();
        serde_names_agree::<EvalTaskKind>();
        serde_names_agree::<AdapterTargets>();
        serde_names_agree::<LrSchedule>();
        serde_names_agree::<Dtype>();
        assert_eq!(Dtype::all().iter().map(|d| d.name()).collect::<Vec<_>>(), ["f32", "bf16"]);
    }
}
