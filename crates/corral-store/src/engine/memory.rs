//! An in-memory engine for tests: copy-on-write maps behind one lock.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::{Arc, RwLock};

use super::{Batch, Cf, Cursor, Engine, Result, View, WriteOp};

type Maps = [BTreeMap<Vec<u8>, Vec<u8>>; 6];

/// Every column family as a `BTreeMap`. Views share the maps; a write copies them only
/// while a view is alive, so tests see the same snapshot semantics as RocksDB.
#[derive(Default)]
pub struct MemEngine {
    maps: RwLock<Arc<Maps>>,
}

impl MemEngine {
    pub fn new() -> Self {
        Self::default()
    }
}

impl Engine for MemEngine {
    fn view(&self) -> Box<dyn View + '_> {
        Box::new(MemView { maps: self.maps.read().expect("engine lock").clone() })
    }

    fn write(&self, batch: Batch, _sync: bool) -> Result<()> {
        let mut guard = self.maps.write().expect("engine lock");
        let maps = Arc::make_mut(&mut guard);
        for op in batch.ops {
            match op {
                WriteOp::Put { cf, key, value } => {
                    maps[cf.index()].insert(key, value);
                }
                WriteOp::Delete { cf, key } => {
                    maps[cf.index()].remove(&key);
                }
                WriteOp::DeleteRange { cf, start, end } => {
                    let map = &mut maps[cf.index()];
                    let doomed: Vec<Vec<u8>> = map.range(start..end).map(|(k, _)| k.clone()).collect();
                    for key in doomed {
                        map.remove(&key);
                    }
                }
            }
        }
        Ok(())
    }

    fn write_replayable(&self, batch: Batch) -> Result<()> {
        self.write(batch, false)
    }

    fn sync(&self) -> Result<()> {
        Ok(())
    }

    fn size_bytes(&self) -> u64 {
        let maps = self.maps.read().expect("engine lock").clone();
        maps.iter().flat_map(|m| m.iter()).map(|(k, v)| (k.len() + v.len()) as u64).sum()
    }

    fn defragment(&self) -> Result<()> {
        Ok(())
    }

    fn checkpoint(&self, _dir: &std::path::Path) -> Result<()> {
        Err(std::io::Error::new(std::io::ErrorKind::Unsupported, "the memory engine has no files").into())
    }
}

struct MemView {
    maps: Arc<Maps>,
}

impl View for MemView {
    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self.maps[cf.index()].get(key).cloned())
    }

    fn cursor(&self, cf: Cf) -> Box<dyn Cursor + '_> {
        Box::new(MemCursor { map: &self.maps[cf.index()], current: None })
    }
}

struct MemCursor<'a> {
    map: &'a BTreeMap<Vec<u8>, Vec<u8>>,
    current: Option<(&'a Vec<u8>, &'a Vec<u8>)>,
}

impl Cursor for MemCursor<'_> {
    fn seek(&mut self, key: &[u8]) {
        self.current = self.map.range::<[u8], _>((Bound::Included(key), Bound::Unbounded)).next();
    }

    fn seek_for_prev(&mut self, key: &[u8]) {
        self.current = self.map.range::<[u8], _>((Bound::Unbounded, Bound::Included(key))).next_back();
    }

    fn valid(&self) -> bool {
        self.current.is_some()
    }

    fn key(&self) -> &[u8] {
        self.current.expect("cursor is valid").0
    }

    fn value(&self) -> &[u8] {
        self.current.expect("cursor is valid").1
    }

    fn next(&mut self) {
        if let Some((key, _)) = self.current {
            self.current = self.map.range::<[u8], _>((Bound::Excluded(key.as_slice()), Bound::Unbounded)).next();
        }
    }

    fn prev(&mut self) {
        if let Some((key, _)) = self.current {
            self.current = self.map.range::<[u8], _>((Bound::Unbounded, Bound::Excluded(key.as_slice()))).next_back();
        }
    }

    fn status(&self) -> Result<()> {
        Ok(())
    }
}
