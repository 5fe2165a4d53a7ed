//! The layout version of a pin folder: a one-entry array map pinned as `layout`, holding
//! [`maps::LAYOUT_VERSION`] of the agent that created the folder.
//!
//! It is read before anything in the folder is opened for writing, so an agent never writes
//! into maps laid out by another version: it refuses, naming the folder, both versions and
//! what to do. Versions listed in [`maps::LAYOUT_ADOPTS`] (purely additive changes) are
//! taken over: the new maps are created next to the old ones and the version is updated.

use std::path::Path;

use aya::maps::{Array, Map, MapData};
use aya_obj::generated::bpf_map_type;
use proxy_common::maps;

use super::DatapathError;

/// What a pin folder holds, as far as its layout goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// No pins at all: a new folder, to be stamped with this version.
    Fresh,
    /// Pins of this version.
    Current,
    /// Pins of an older version this one takes over in place (see [`maps::LAYOUT_ADOPTS`]).
    Adoptable(u32),
}

fn map_err(source: aya::maps::MapError) -> DatapathError {
    DatapathError::Map {
        name: maps::LAYOUT.to_string(),
        source,
    }
}

/// The version recorded under `dir`, `None` if there is no `layout` pin. A `layout` pin
/// that is not a one-entry u32 array is [`DatapathError::Unversioned`] (not ours to
/// interpret); failing to open or read it (permissions, memory) is passed on as it is, so
/// a passing problem is not reported as pins to clean up.
pub fn read_version(dir: &Path) -> Result<Option<u32>, DatapathError> {
    let path = dir.join(maps::LAYOUT);
    if !path.exists() {
        return Ok(None);
    }
    let data = MapData::from_pin(&path).map_err(map_err)?;
    let not_ours = |_| DatapathError::Unversioned {
        dir: dir.to_path_buf(),
    };
    let array: Array<MapData, u32> = Map::from_map_data(data)
        .map_err(not_ours)?
        .try_into()
        .map_err(not_ours)?;
    array.get(&0, 0).map(Some).map_err(map_err)
}

/// Checks the layout of the pins under `dir` without writing anything.
pub fn check(dir: &Path) -> Result<Layout, DatapathError> {
    check_with(dir, maps::LAYOUT_VERSION, maps::LAYOUT_ADOPTS)
}

/// [`check`] for a binary of layout `want` that adopts `adopts`.
fn check_with(dir: &Path, want: u32, adopts: &[u32]) -> Result<Layout, DatapathError> {
    match read_version(dir)? {
        Some(v) if v == want => Ok(Layout::Current),
        Some(v) if adopts.contains(&v) => Ok(Layout::Adoptable(v)),
        Some(v) => Err(DatapathError::LayoutMismatch {
            dir: dir.to_path_buf(),
            found: v,
            want,
        }),
        None if has_pins(dir) => Err(DatapathError::Unversioned {
            dir: dir.to_path_buf(),
        }),
        None => Ok(Layout::Fresh),
    }
}

/// Whether `dir` holds anything (pins or the link folder).
fn has_pins(dir: &Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|mut entries| entries.next().is_some())
}

/// Records this version under `dir`: creates the `layout` pin (a fresh folder, before any
/// map is pinned, so no folder has maps without a version) or updates it (after taking
/// over an adoptable one).
pub fn stamp(dir: &Path) -> Result<(), DatapathError> {
    stamp_with(dir, maps::LAYOUT_VERSION)
}

fn stamp_with(dir: &Path, version: u32) -> Result<(), DatapathError> {
    let path = dir.join(maps::LAYOUT);
    if path.exists() {
        let data = MapData::from_pin(&path).map_err(map_err)?;
        let mut array: Array<MapData, u32> = Map::from_map_data(data)
            .map_err(map_err)?
            .try_into()
            .map_err(map_err)?;
        return array.set(0, version, 0).map_err(map_err);
    }
    let obj = aya_obj::Map::new_from_params(
        bpf_map_type::BPF_MAP_TYPE_ARRAY as u32,
        size_of::<u32>() as u32,
        size_of::<u32>() as u32,
        1,
        0,
    );
    let data = MapData::create(obj, "bpfproxy_layout", None).map_err(map_err)?;
    let mut array: Array<MapData, u32> = Map::from_map_data(data)
        .map_err(map_err)?
        .try_into()
        .map_err(map_err)?;
    // The version is in before the pin appears, so no reader sees a 0.
    array.set(0, version, 0).map_err(map_err)?;
    array.pin(&path).map_err(|e| DatapathError::Bpffs {
        path: path.clone(),
        reason: format!("pinning the layout version: {e}"),
    })
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::datapath::bpffs;

    /// A pin folder of this test on bpffs, removed on drop (needs root, like CI).
    struct Folder(PathBuf);

    impl Drop for Folder {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn versions_are_stamped_taken_over_when_additive_and_refused_otherwise() {
        let dir = PathBuf::from(format!(
            "/sys/fs/bpf/bpfproxy-unit-layout-{}",
            std::process::id()
        ));
        let folder = Folder(dir.clone());
        bpffs::ensure_pin_dir(&folder.0).expect("a pin folder on bpffs (run as root)");

        // Version 3 adopts 2 (say 3 only added a map).
        assert_eq!(check_with(&dir, 3, &[2]).unwrap(), Layout::Fresh);
        stamp_with(&dir, 2).unwrap();
        assert_eq!(read_version(&dir).unwrap(), Some(2));
        assert_eq!(check_with(&dir, 3, &[2]).unwrap(), Layout::Adoptable(2));
        stamp_with(&dir, 3).unwrap();
        assert_eq!(check_with(&dir, 3, &[2]).unwrap(), Layout::Current);

        // A binary of version 2 does not understand 3, nor does 4 (which adopts only 2).
        for (want, adopts) in [(2, &[][..]), (4, &[2][..])] {
            let err = check_with(&dir, want, adopts).unwrap_err();
            let text = err.to_string();
            assert!(
                matches!(err, DatapathError::LayoutMismatch { found: 3, .. }),
                "{text}"
            );
            for part in [
                dir.display().to_string(),
                "version 3".into(),
                format!("version {want}"),
                format!("bpfproxy cleanup --bpffs {}", dir.display()),
            ] {
                assert!(text.contains(&part), "{part:?} missing from {text}");
            }
        }

        // Pins without a version record are nobody's to interpret.
        std::fs::remove_file(dir.join(maps::LAYOUT)).unwrap();
        std::fs::create_dir(dir.join(maps::LINKS_DIR)).unwrap();
        assert!(matches!(
            check_with(&dir, 3, &[2]),
            Err(DatapathError::Unversioned { .. })
        ));

        // Nor is a `layout` pin of another map type: refused as unversioned, not misread.
        let obj = aya_obj::Map::new_from_params(
            bpf_map_type::BPF_MAP_TYPE_HASH as u32,
            size_of::<u32>() as u32,
            size_of::<u32>() as u32,
            1,
            0,
        );
        let other = MapData::create(obj, "not_a_layout", None).unwrap();
        other.pin(dir.join(maps::LAYOUT)).unwrap();
        assert!(matches!(
            check_with(&dir, 3, &[2]),
            Err(DatapathError::Unversioned { .. })
        ));
    }
}
