//! The compact forms in which the dataflow keeps the rows of its large tables.
//!
//! Every detection and occurrence sits in several arrangements (its table's upsert
//! arrangement, then keyed by occurrence, image and event), so their width is most of the
//! engine's memory. `Option<i64>` and `Option<Score>` take 16 bytes each; here a NULL is a
//! reserved bit pattern instead and each column takes 8. [`Inputs::send`](super::Inputs::send)
//! converts the [`crate::model`] rows on the way in, and nothing outside the graph sees these.
//!
//! The reserved patterns: `i64::MIN` for a NULL id, timestamp or size (Postgres cannot store
//! that timestamp, sizes are never negative, and Antenna's ids are positive; an id of
//! `i64::MIN` written by hand would read as NULL), and one NaN payload for a NULL score (every
//! NaN score is stored as the canonical NaN, which Postgres treats as equal to every NaN
//! anyway).

use serde::{Deserialize, Serialize};

use crate::model::{Detection, Id, Image, Micros, Occurrence, Score};

/// A nullable `bigint` in 8 bytes; `i64::MIN` is NULL.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct OptI64(i64);

impl OptI64 {
    const NULL: i64 = i64::MIN;

    /// The value, `None` for NULL.
    pub fn get(self) -> Option<i64> {
        (self.0 != Self::NULL).then_some(self.0)
    }
}

impl From<Option<i64>> for OptI64 {
    fn from(value: Option<i64>) -> Self {
        OptI64(value.unwrap_or(Self::NULL))
    }
}

impl std::fmt::Debug for OptI64 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.get().fmt(f)
    }
}

/// A nullable `double precision` in 8 bytes: a NaN payload no canonical NaN uses is NULL.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct OptScore(u64);

impl OptScore {
    /// A negative NaN with a payload: never produced by [`OptScore::from`] for a value.
    const NULL: u64 = 0xFFF8_0000_7A11_0001;
    /// Every NaN value is kept as this one.
    const NAN: u64 = 0x7FF8_0000_0000_0000;

    /// The score, `None` for NULL.
    pub fn get(self) -> Option<Score> {
        (self.0 != Self::NULL).then(|| Score::new(f64::from_bits(self.0)))
    }
}

impl From<Option<Score>> for OptScore {
    fn from(value: Option<Score>) -> Self {
        match value {
            None => OptScore(Self::NULL),
            Some(s) if s.get().is_nan() => OptScore(Self::NAN),
            Some(s) => OptScore(s.get().to_bits()),
        }
    }
}

impl std::fmt::Debug for OptScore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.get().fmt(f)
    }
}

/// An image: 40 bytes instead of 80.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ImageRow {
    pub event: OptI64,
    pub deployment: OptI64,
    pub project: OptI64,
    pub timestamp: OptI64,
    pub size: OptI64,
}

impl ImageRow {
    pub fn event(&self) -> Option<Id> {
        self.event.get()
    }
    pub fn deployment(&self) -> Option<Id> {
        self.deployment.get()
    }
    pub fn project(&self) -> Option<Id> {
        self.project.get()
    }
    pub fn timestamp(&self) -> Option<Micros> {
        self.timestamp.get()
    }
    pub fn size(&self) -> Option<i64> {
        self.size.get()
    }
}

impl From<&Image> for ImageRow {
    fn from(row: &Image) -> Self {
        ImageRow {
            event: row.event.into(),
            deployment: row.deployment.into(),
            project: row.project.into(),
            timestamp: row.timestamp.into(),
            size: row.size.into(),
        }
    }
}

/// A valid detection: 16 bytes instead of 32. An invalid one (NULL bbox) never counts, so the
/// dataflow holds it as absent: it is sent as a delete.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct DetectionRow {
    pub image: Id,
    pub occurrence: OptI64,
}

impl DetectionRow {
    /// The row the dataflow holds for `row`: none when it is invalid.
    pub fn of(row: &Detection) -> Option<Self> {
        row.valid.then(|| DetectionRow { image: row.image, occurrence: row.occurrence.into() })
    }
}

/// An occurrence: 32 bytes instead of 64.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct OccurrenceRow {
    pub event: OptI64,
    pub deployment: OptI64,
    pub determination: OptI64,
    pub score: OptScore,
}

impl From<&Occurrence> for OccurrenceRow {
    fn from(row: &Occurrence) -> Self {
        OccurrenceRow {
            event: row.event.into(),
            deployment: row.deployment.into(),
            determination: row.determination.into(),
            score: row.score.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nulls_and_values_round_trip() {
        for v in [None, Some(0), Some(1), Some(-1), Some(i64::MAX), Some(i64::MIN + 1)] {
            assert_eq!(OptI64::from(v).get(), v);
        }
        for v in [None, Some(0.0), Some(-0.0), Some(0.5), Some(f64::INFINITY), Some(f64::NEG_INFINITY), Some(-1e300)] {
            let score = v.map(Score::new);
            assert_eq!(OptScore::from(score).get(), score);
        }
        // Every NaN, whatever its payload or sign, is one NaN and never NULL.
        for bits in [0x7FF8_0000_0000_0000u64, 0xFFF8_0000_0000_0000, 0x7FF0_0000_0000_0001, OptScore::NULL] {
            let nan = Score::new(f64::from_bits(bits));
            let kept = OptScore::from(Some(nan)).get().expect("a NaN is a value");
            assert!(kept.get().is_nan());
        }
        assert_eq!(std::mem::size_of::<ImageRow>(), 40);
        assert_eq!(std::mem::size_of::<DetectionRow>(), 16);
        assert_eq!(std::mem::size_of::<OccurrenceRow>(), 32);
    }
}
