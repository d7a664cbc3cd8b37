//! The determination rule of Antenna's `update_occurrence_determination` (data-model §3.4,
//! SPEC §3 rule 5), as a pure function over an occurrence's classifications.
//!
//! - A non-withdrawn human identification wins outright (score 1.0), and while one exists the
//!   machine is ignored.
//! - Otherwise the predictions are the classifications whose score is one of the per-algorithm
//!   maximum scores of the occurrence; the best is terminal first, then highest score, then
//!   newest (Antenna's API order adds `-pk`).
//! - Determination and score are written only when the winning taxon differs from the current
//!   one, and a winning score of 0 is not written (Antenna tests the score for truthiness).

use std::collections::HashMap;

/// A classification of one of the occurrence's detections.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Candidate {
    /// Orders candidates of equal rank: larger is newer (the row id, or above every stored id
    /// for rows being inserted).
    pub order: i64,
    /// Its taxon.
    pub taxon: Option<i64>,
    /// Its algorithm.
    pub algorithm: Option<i64>,
    /// Its score (`max(scores)`).
    pub score: Option<f64>,
    /// Whether it is a final classification.
    pub terminal: bool,
}

/// A new determination for an occurrence.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Determination {
    /// The winning taxon.
    pub taxon: Option<i64>,
    /// The score to write; `None` keeps the stored score (a winning score of 0 is not written).
    pub score: Option<f64>,
}

/// The most recent non-withdrawn human identification of an occurrence, if any.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identification {
    /// Its taxon (an identification whose taxon was deleted has none).
    pub taxon: Option<i64>,
}

/// What the occurrence's determination becomes, or `None` when it does not change.
pub fn determine(
    current: Option<i64>,
    human: Option<Identification>,
    candidates: &[Candidate],
) -> Option<Determination> {
    if let Some(id) = human {
        return match id.taxon {
            Some(taxon) if Some(taxon) != current => Some(Determination { taxon: Some(taxon), score: Some(1.0) }),
            _ => None,
        };
    }
    // Per-algorithm maximum scores (a NULL algorithm is a group of its own, as in SQL GROUP BY;
    // NULL scores take no part in max).
    let mut maxima: HashMap<Option<i64>, f64> = HashMap::new();
    for c in candidates {
        if let Some(s) = c.score {
            maxima.entry(c.algorithm).and_modify(|m| *m = m.max(s)).or_insert(s);
        }
    }
    let best =
        candidates.iter().filter(|c| c.score.is_some_and(|s| maxima.values().any(|m| *m == s))).max_by(|a, b| {
            (a.terminal, a.score.unwrap_or(f64::NEG_INFINITY), a.order)
                .partial_cmp(&(b.terminal, b.score.unwrap_or(f64::NEG_INFINITY), b.order))
                .unwrap_or(std::cmp::Ordering::Equal)
        })?;
    if best.taxon.is_none() || best.taxon == current {
        return None;
    }
    Some(Determination { taxon: best.taxon, score: best.score.filter(|s| *s != 0.0) })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(order: i64, taxon: i64, algorithm: i64, score: f64, terminal: bool) -> Candidate {
        Candidate { order, taxon: Some(taxon), algorithm: Some(algorithm), score: Some(score), terminal }
    }

    #[test]
    fn terminal_beats_a_higher_non_terminal_score() {
        let got = determine(None, None, &[c(1, 10, 1, 0.99, false), c(2, 20, 2, 0.5, true)]);
        assert_eq!(got, Some(Determination { taxon: Some(20), score: Some(0.5) }));
    }

    #[test]
    fn a_lone_non_terminal_classification_determines() {
        assert_eq!(determine(None, None, &[c(1, 10, 1, 0.99, false)]).map(|d| d.taxon), Some(Some(10)));
    }

    #[test]
    fn only_an_algorithm_s_top_scores_are_predictions() {
        // Algorithm 2's 0.9 for taxon 30 is not its maximum (0.95 for taxon 20).
        let got = determine(None, None, &[c(1, 30, 2, 0.9, true), c(2, 20, 2, 0.95, true), c(3, 40, 3, 0.6, true)]);
        assert_eq!(got.map(|d| d.taxon), Some(Some(20)));
        // A score equal to another algorithm's maximum counts (Antenna's `score IN maxima`).
        let got = determine(None, None, &[c(1, 30, 2, 0.6, true), c(2, 20, 2, 0.7, true), c(3, 40, 3, 0.6, true)]);
        assert_eq!(got.map(|d| d.taxon), Some(Some(20)));
    }

    #[test]
    fn nothing_changes_when_the_winner_is_the_current_taxon() {
        // Antenna keeps the old score: itea 0.7 then itea 0.9 leaves 0.7.
        assert_eq!(determine(Some(10), None, &[c(1, 10, 1, 0.7, true), c(2, 10, 1, 0.9, true)]), None);
    }

    #[test]
    fn a_winning_zero_score_is_not_written() {
        assert_eq!(
            determine(None, None, &[c(1, 10, 1, 0.0, true)]),
            Some(Determination { taxon: Some(10), score: None })
        );
    }

    #[test]
    fn ties_go_to_the_newest() {
        assert_eq!(
            determine(None, None, &[c(5, 10, 1, 0.8, true), c(9, 20, 2, 0.8, true)]).map(|d| d.taxon),
            Some(Some(20))
        );
    }

    #[test]
    fn a_human_identification_overrides_and_silences_the_machine() {
        let human = Some(Identification { taxon: Some(77) });
        assert_eq!(
            determine(Some(10), human, &[c(1, 10, 1, 0.99, true)]),
            Some(Determination { taxon: Some(77), score: Some(1.0) })
        );
        assert_eq!(determine(Some(77), human, &[c(1, 10, 1, 0.99, true)]), None);
        // An identification without a taxon still silences the machine.
        assert_eq!(determine(None, Some(Identification { taxon: None }), &[c(1, 10, 1, 0.99, true)]), None);
    }

    #[test]
    fn no_classifications_no_determination() {
        assert_eq!(determine(None, None, &[]), None);
        let unscored = Candidate { order: 1, taxon: Some(1), algorithm: Some(1), score: None, terminal: true };
        assert_eq!(determine(None, None, &[unscored]), None);
    }
}
