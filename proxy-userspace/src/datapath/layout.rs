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

/// The version recorded under `dir`, `None` if there is no `layout` pin.
pub fn read_version(dir: &Path) -> Result<Option<u32>, DatapathError> {
    let path = dir.join(maps::LAYOUT);
    if !path.exists() {
        return Ok(None);
    }
    let data = MapData::from_pin(&path).map_err(map_err)?;
    let array: Array<MapData, u32> = Map::from_map_data(data)
        .map_err(map_err)?
        .try_into()
        .map_err(map_err)?;
    array.get(&0, 0).map(Some).map_err(map_err)
}

/// Checks the layout of the pins under `dir` without writing anything.
pub fn check(dir: &Path) -> Result<Layout, DatapathError> {
    let found = match read_version(dir) {
        Ok(found) => found,
        // A `layout` pin that is not a u32 array: not ours to interpret.
        Err(_) => {
            return Err(DatapathError::Unversioned {
                dir: dir.to_path_buf(),
            });
        }
    };
    match found {
        Some(v) if v == maps::LAYOUT_VERSION => Ok(Layout::Current),
        Some(v) if maps::LAYOUT_ADOPTS.contains(&v) => Ok(Layout::Adoptable(v)),
        Some(v) => Err(DatapathError::LayoutMismatch {
            dir: dir.to_path_buf(),
            found: v,
            want: maps::LAYOUT_VERSION,
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
    let path = dir.join(maps::LAYOUT);
    if path.exists() {
        let data = MapData::from_pin(&path).map_err(map_err)?;
        let mut array: Array<MapData, u32> = Map::from_map_data(data)
            .map_err(map_err)?
            .try_into()
            .map_err(map_err)?;
        return array.set(0, maps::LAYOUT_VERSION, 0).map_err(map_err);
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
    array.set(0, maps::LAYOUT_VERSION, 0).map_err(map_err)?;
    array.pin(&path).map_err(|e| DatapathError::Bpffs {
        path: path.clone(),
        reason: format!("pinning the layout version: {e}"),
    })
}
