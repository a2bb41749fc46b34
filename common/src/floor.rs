//! The store's free-space floor (SECURITY.md A43): `store-free-space-floor` and
//! `store-free-inodes-floor`. Below either, untrusted builds writing to the store's file
//! system are stopped (builder-helper) and untrusted adds are refused (store-writer), so the
//! room left is for trusted users and for cleaning up. Free space is what an unprivileged
//! writer may use (`f_bavail`, `f_favail`): build users see no more than that.

use std::fmt;
use std::os::fd::AsFd;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::conf::value::{Ctx, SettingValue};
use crate::conf::{ValueError, WarningKind};

/// `auto` space floor: the smaller of this and [`AUTO_PERCENT`] of the file system.
pub const AUTO_SPACE: u64 = 1 << 30;
/// `auto` inode floor: the smaller of this and [`AUTO_PERCENT`] of the inodes.
pub const AUTO_INODES: u64 = 65_536;
/// The share of the file system an `auto` floor holds back at most.
pub const AUTO_PERCENT: u8 = 5;

/// A floor as written: `auto`, an absolute amount (0: none), or a share of the file system.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Floor {
    Auto,
    Fixed(u64),
    Percent(u8),
}

impl Floor {
    /// The floor on a file system of `total` units, `auto` being the smaller of `auto_cap`
    /// and [`AUTO_PERCENT`] % of it.
    pub fn resolve(self, total: u64, auto_cap: u64) -> u64 {
        let share = |p: u8| {
            let v = u128::from(total) * u128::from(p) / 100;
            u64::try_from(v).unwrap_or(u64::MAX)
        };
        match self {
            Floor::Auto => auto_cap.min(share(AUTO_PERCENT)),
            Floor::Fixed(n) => n,
            Floor::Percent(p) => share(p),
        }
    }

    fn parse(
        name: &'static str,
        text: &str,
        amount: impl Fn(&str) -> Option<u64>,
        what: &'static str,
    ) -> Result<Floor, ValueError> {
        let invalid = || ValueError::Invalid {
            name,
            value: text.into(),
            reason: what,
        };
        if text == "auto" {
            return Ok(Floor::Auto);
        }
        if let Some(p) = text.strip_suffix('%') {
            if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
                return Err(invalid());
            }
            return match p.parse::<u8>() {
                Ok(n) if n <= 100 => Ok(Floor::Percent(n)),
                _ => Err(invalid()),
            };
        }
        amount(text).map(Floor::Fixed).ok_or_else(invalid)
    }

    fn render(self) -> String {
        match self {
            Floor::Auto => "auto".into(),
            Floor::Fixed(n) => n.to_string(),
            Floor::Percent(p) => format!("{p}%"),
        }
    }
}

/// `store-free-space-floor`: bytes (`K`, `M`, `G`, `T` suffixes), `N%` or `auto`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpaceFloor(pub Floor);

/// `store-free-inodes-floor`: a count, `N%` or `auto`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InodeFloor(pub Floor);

impl SettingValue for SpaceFloor {
    fn assign(
        &mut self,
        name: &'static str,
        text: &str,
        _: bool,
        _: Ctx,
        _: &mut Vec<WarningKind>,
    ) -> Result<(), ValueError> {
        let size = |t: &str| crate::conf::parse_size(name, t, "").ok();
        self.0 = Floor::parse(
            name,
            text,
            size,
            "expected 'auto', a size (bytes, or with a K, M, G or T suffix) or a percentage",
        )?;
        Ok(())
    }
    fn render(&self) -> String {
        self.0.render()
    }
}

impl SettingValue for InodeFloor {
    fn assign(
        &mut self,
        name: &'static str,
        text: &str,
        _: bool,
        _: Ctx,
        _: &mut Vec<WarningKind>,
    ) -> Result<(), ValueError> {
        let count = |t: &str| {
            (!t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()))
                .then(|| t.parse().ok())
                .flatten()
        };
        self.0 = Floor::parse(
            name,
            text,
            count,
            "expected 'auto', a number of inodes or a percentage",
        )?;
        Ok(())
    }
    fn render(&self) -> String {
        self.0.render()
    }
}

/// What a file system has, as `statvfs` says.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FsFree {
    pub bytes_total: u64,
    pub bytes_free: u64,
    /// 0 where the file system has no fixed number of inodes (btrfs): no inode floor then.
    pub inodes_total: u64,
    pub inodes_free: u64,
}

impl FsFree {
    pub fn of_path(path: &Path) -> std::io::Result<FsFree> {
        Ok(Self::from_stat(&nix::sys::statvfs::statvfs(path)?))
    }

    pub fn of_fd(fd: impl AsFd) -> std::io::Result<FsFree> {
        Ok(Self::from_stat(&nix::sys::statvfs::fstatvfs(fd)?))
    }

    #[allow(clippy::useless_conversion)] // the field types differ between targets
    fn from_stat(s: &nix::sys::statvfs::Statvfs) -> FsFree {
        let unit = u64::from(s.fragment_size()).max(1);
        FsFree {
            bytes_total: u64::from(s.blocks()).saturating_mul(unit),
            bytes_free: u64::from(s.blocks_available()).saturating_mul(unit),
            inodes_total: u64::from(s.files()),
            inodes_free: u64::from(s.files_available()),
        }
    }
}

/// Both floors, as configured (resolved against each file system where it is looked at).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Floors {
    pub space: SpaceFloor,
    pub inodes: InodeFloor,
}

impl Floors {
    /// No floor at all.
    pub const NONE: Floors = Floors {
        space: SpaceFloor(Floor::Fixed(0)),
        inodes: InodeFloor(Floor::Fixed(0)),
    };

    /// Which floor `fs` would be below once `bytes` and `inodes` more are used, if any.
    pub fn crossed(&self, fs: &FsFree, bytes: u64, inodes: u64) -> Option<Crossed> {
        let space = self.space.0.resolve(fs.bytes_total, AUTO_SPACE);
        if space > 0 && fs.bytes_free.saturating_sub(bytes) < space {
            return Some(Crossed {
                inodes: false,
                free: fs.bytes_free,
                floor: space,
            });
        }
        let inode_floor = self.inodes.0.resolve(fs.inodes_total, AUTO_INODES);
        if fs.inodes_total > 0
            && inode_floor > 0
            && fs.inodes_free.saturating_sub(inodes) < inode_floor
        {
            return Some(Crossed {
                inodes: true,
                free: fs.inodes_free,
                floor: inode_floor,
            });
        }
        None
    }
}

/// A floor that is (or would be) crossed: how much is free and the floor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Crossed {
    /// The inode floor (else the space floor).
    pub inodes: bool,
    pub free: u64,
    pub floor: u64,
}

impl Crossed {
    /// The setting, as audited (`limit=…`).
    pub fn setting(&self) -> &'static str {
        if self.inodes {
            "store-free-inodes-floor"
        } else {
            "store-free-space-floor"
        }
    }

    /// What is counted: `bytes` or `inodes`.
    pub fn unit(&self) -> &'static str {
        if self.inodes {
            "inodes"
        } else {
            "bytes"
        }
    }
}

impl fmt::Display for Crossed {
    /// `the store's file system has 12 bytes free, below its floor of 34 (store-free-space-floor)`
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let unit = self.unit();
        write!(
            f,
            "the store's file system has {} {unit} free, less than its floor of {} {unit} ({})",
            self.free,
            self.floor,
            self.setting()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn space(text: &str) -> Result<Floor, ValueError> {
        let mut v = SpaceFloor(Floor::Auto);
        v.assign(
            "store-free-space-floor",
            text,
            false,
            Ctx { cpus: 1 },
            &mut Vec::new(),
        )
        .map(|()| v.0)
    }

    fn inodes(text: &str) -> Result<Floor, ValueError> {
        let mut v = InodeFloor(Floor::Auto);
        v.assign(
            "store-free-inodes-floor",
            text,
            false,
            Ctx { cpus: 1 },
            &mut Vec::new(),
        )
        .map(|()| v.0)
    }

    #[test]
    fn floors_parse() {
        assert_eq!(space("auto"), Ok(Floor::Auto));
        assert_eq!(space("0"), Ok(Floor::Fixed(0)));
        assert_eq!(space("16M"), Ok(Floor::Fixed(16 << 20)));
        assert_eq!(space("5%"), Ok(Floor::Percent(5)));
        assert_eq!(space("100%"), Ok(Floor::Percent(100)));
        assert_eq!(inodes("1000"), Ok(Floor::Fixed(1000)));
        assert_eq!(inodes("2%"), Ok(Floor::Percent(2)));
        for bad in ["", "%", "101%", "-1%", "1.5%", "5 %", "1G%", "8g", "x"] {
            assert!(space(bad).is_err(), "space {bad:?}");
        }
        for bad in ["", "1K", "-1", "300%", "+5"] {
            assert!(inodes(bad).is_err(), "inodes {bad:?}");
        }
        assert_eq!(SpaceFloor(Floor::Percent(7)).render(), "7%");
        assert_eq!(InodeFloor(Floor::Auto).render(), "auto");
    }

    #[test]
    fn auto_is_the_smaller_of_its_cap_and_five_percent() {
        // 8 GiB: 5 % is 409.6 MiB, under 1 GiB.
        assert_eq!(Floor::Auto.resolve(8 << 30, AUTO_SPACE), (8u64 << 30) / 20);
        // 1 TiB: 5 % is 51 GiB, the cap holds.
        assert_eq!(Floor::Auto.resolve(1 << 40, AUTO_SPACE), 1 << 30);
        assert_eq!(Floor::Auto.resolve(10_000, AUTO_INODES), 500);
        assert_eq!(Floor::Auto.resolve(100_000_000, AUTO_INODES), AUTO_INODES);
        assert_eq!(Floor::Percent(100).resolve(u64::MAX, 0), u64::MAX);
        assert_eq!(Floor::Percent(0).resolve(1 << 40, 0), 0);
        assert_eq!(Floor::Fixed(7).resolve(1, 0), 7);
    }

    fn fs(bytes_free: u64, inodes_free: u64, inodes_total: u64) -> FsFree {
        FsFree {
            bytes_total: 1000,
            bytes_free,
            inodes_total,
            inodes_free,
        }
    }

    #[test]
    fn crossing_counts_what_is_about_to_be_used() {
        let f = Floors {
            space: SpaceFloor(Floor::Fixed(100)),
            inodes: InodeFloor(Floor::Percent(10)),
        };
        assert_eq!(f.crossed(&fs(100, 50, 200), 0, 0), None);
        let c = f
            .crossed(&fs(99, 50, 200), 0, 0)
            .expect("under the space floor");
        assert_eq!((c.inodes, c.free, c.floor), (false, 99, 100));
        assert_eq!(c.setting(), "store-free-space-floor");
        assert!(f.crossed(&fs(150, 50, 200), 51, 0).is_some());
        assert_eq!(f.crossed(&fs(150, 50, 200), 50, 0), None);
        // 10 % of 200 inodes is 20.
        let c = f
            .crossed(&fs(500, 19, 200), 0, 0)
            .expect("under the inode floor");
        assert_eq!((c.inodes, c.free, c.floor), (true, 19, 20));
        assert!(c
            .to_string()
            .contains("19 inodes free, less than its floor of 20 inodes"));
        // No fixed inode count (btrfs): no inode floor.
        assert_eq!(f.crossed(&fs(500, 0, 0), 0, 0), None);
        // An add larger than what is free saturates rather than wrapping.
        assert!(f.crossed(&fs(500, 50, 200), u64::MAX, 0).is_some());
        assert_eq!(
            Floors::NONE.crossed(&fs(0, 0, 200), u64::MAX, u64::MAX),
            None
        );
    }
}
