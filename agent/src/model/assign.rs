//! Placement of a new client: the seed's "fewest clients" rule, weighted.

use super::Uplink;

/// Index of the uplink with the fewest clients per unit of weight. Ties go to the uplink
/// listed first, so every run makes the same choice.
pub fn least_loaded(uplinks: &[Uplink], counts: &[usize]) -> usize {
    assert!(
        !uplinks.is_empty(),
        "config validation guarantees at least one uplink"
    );
    let mut best = 0;
    for i in 1..uplinks.len() {
        // counts[i]/w[i] < counts[best]/w[best], in integers.
        let lhs = counts[i] as u128 * uplinks[best].weight as u128;
        let rhs = counts[best] as u128 * uplinks[i].weight as u128;
        if lhs < rhs {
            best = i;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::LinkState;

    fn uplinks(weights: &[u32]) -> Vec<Uplink> {
        weights
            .iter()
            .enumerate()
            .map(|(i, &weight)| Uplink {
                name: format!("u{i}"),
                interface: format!("w{i}"),
                weight,
                link: LinkState::default(),
            })
            .collect()
    }

    #[test]
    fn ties_go_to_first() {
        assert_eq!(least_loaded(&uplinks(&[1, 1, 1]), &[0, 0, 0]), 0);
        assert_eq!(least_loaded(&uplinks(&[1, 1, 1]), &[1, 0, 0]), 1);
    }

    #[test]
    fn weight_counts() {
        // 3/2 = 1.5 vs 2/1 = 2: the weighted uplink is less loaded.
        assert_eq!(least_loaded(&uplinks(&[2, 1]), &[3, 2]), 0);
        assert_eq!(least_loaded(&uplinks(&[2, 1]), &[4, 1]), 1);
    }

    #[test]
    fn sequence_converges_to_weights() {
        let u = uplinks(&[3, 1]);
        let mut counts = vec![0, 0];
        for _ in 0..400 {
            let i = least_loaded(&u, &counts);
            counts[i] += 1;
        }
        assert_eq!(counts, vec![300, 100]);
    }
}
