//! Per-connection clamps (a Stockade addition: nix-daemon 2.8 applies the client's `max-jobs` and
//! `cores` from SetOptions as sent, for trusted and untrusted clients alike).

/// The client's `max-jobs`, never above the daemon's configured value (`auto` already resolved
/// to a number by the caller). 0 (build nothing locally) is always allowed.
pub fn clamp_max_jobs(requested: u64, configured: u64) -> u64 {
    requested.min(configured)
}

/// The client's `cores`, never above the daemon's configured value. 0 means "all cores": a
/// client asking for 0 gets the configured value when one is set; when the daemon itself is
/// configured with 0 there is nothing to clamp to and the request stands.
pub fn clamp_cores(requested: u64, configured: u64) -> u64 {
    match (requested, configured) {
        (r, 0) => r,
        (0, c) => c,
        (r, c) => r.min(c),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_jobs_table() {
        for (req, conf, want) in [
            (1, 4, 1),
            (4, 4, 4),
            (64, 4, 4),
            (u64::MAX, 8, 8),
            (0, 4, 0),
            (3, 0, 0),
        ] {
            assert_eq!(clamp_max_jobs(req, conf), want, "max-jobs {req} / {conf}");
        }
    }

    #[test]
    fn cores_table() {
        for (req, conf, want) in [
            (2, 8, 2),
            (8, 8, 8),
            (64, 8, 8),
            (0, 8, 8),
            (0, 0, 0),
            (16, 0, 16),
            (u64::MAX, 1, 1),
        ] {
            assert_eq!(clamp_cores(req, conf), want, "cores {req} / {conf}");
        }
    }
}
