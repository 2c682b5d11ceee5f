//! Placement of a new client: the seed's "fewest clients" rule, weighted.

use super::Uplink;

/// Index of the eligible uplink with the fewest clients per unit of weight. Ties go to
/// the uplink listed first, so every run makes the same choice.
pub fn least_loaded(
    uplinks: &[Uplink],
    counts: &[usize],
    eligible: impl Fn(usize) -> bool,
) -> Option<usize> {
    let mut best: Option<usize> = None;
    for i in (0..uplinks.len()).filter(|&i| eligible(i)) {
        let Some(b) = best else {
            best = Some(i);
            continue;
        };
        // counts[i]/w[i] < counts[b]/w[b], in integers.
        let lhs = counts[i] as u128 * uplinks[b].weight as u128;
        let rhs = counts[b] as u128 * uplinks[i].weight as u128;
        if lhs < rhs {
            best = Some(i);
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uplinks(weights: &[u32]) -> Vec<Uplink> {
        weights
            .iter()
            .enumerate()
            .map(|(i, &weight)| {
                Uplink::new(&format!("u{i}"), &format!("w{i}"), weight, 1, false, 10)
            })
            .collect()
    }

    fn all(_: usize) -> bool {
        true
    }

    #[test]
    fn ties_go_to_first() {
        assert_eq!(least_loaded(&uplinks(&[1, 1, 1]), &[0, 0, 0], all), Some(0));
        assert_eq!(least_loaded(&uplinks(&[1, 1, 1]), &[1, 0, 0], all), Some(1));
        assert_eq!(
            least_loaded(&uplinks(&[1, 1, 1]), &[1, 0, 0], |i| i != 1),
            Some(2)
        );
        assert_eq!(least_loaded(&uplinks(&[1]), &[0], |_| false), None);
    }

    #[test]
    fn weight_counts() {
        // 3/2 = 1.5 vs 2/1 = 2: the weighted uplink is less loaded.
        assert_eq!(least_loaded(&uplinks(&[2, 1]), &[3, 2], all), Some(0));
        assert_eq!(least_loaded(&uplinks(&[2, 1]), &[4, 1], all), Some(1));
    }

    #[test]
    fn sequence_converges_to_weights() {
        let u = uplinks(&[3, 1]);
        let mut counts = vec![0, 0];
        for _ in 0..400 {
            let i = least_loaded(&u, &counts, all).unwrap();
            counts[i] += 1;
        }
        assert_eq!(counts, vec![300, 100]);
    }
}
