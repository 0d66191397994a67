//! Schema migrations, run by a writable open of an older store (see `schema/store.md`).
//!
//! **1 -> 2** (chunked values, f16 embeddings): every object's tensors move from `tensors` (one value per
//! tensor) to `object_tensors` (one chunked stream per object, byte-identical tensors); every embedding
//! from `embeddings` (f32) to `space_embeddings` (chunked, [`super::codec::encode_embedding`]); spaces get
//! a generation, the meta table a change sequence and a store uuid, and `object_facts` is filled from the
//! object records. All in **one write transaction**: a
//! crash or a full disk during the migration leaves the version-1 store as it was, and the next writable
//! open starts again. A read-only open of a version-1 store is refused with the fix (open it once for
//! writing, e.g. `peftdb compact`).

use super::chunked::{self, OBJECT_TENSORS, SPACE_EMBEDDINGS};
use super::{
    codec, During, ObjectFacts, ObjectRecord, SpaceRecord, Store, EMBEDDINGS_V1, META, OBJECTS,
    OBJECT_FACTS, SPACES, TENSORS_V1,
};
use crate::error::StoreError;
use redb::ReadableTable;

impl Store {
    pub(super) fn migrate_v1_to_v2(&self) -> Result<(), StoreError> {
        const DURING: &str = "migrating the store to schema version 2";
        let w = self.write()?;
        {
            let old_t = w.open_table(TENSORS_V1).during(&self.path, DURING)?;
            let mut new_t = w.open_table(OBJECT_TENSORS).during(&self.path, DURING)?;
            let mut cur: Option<u64> = None;
            let mut tensors = Vec::new();
            for item in old_t.iter().during(&self.path, DURING)? {
                let (k, v) = item.during(&self.path, DURING)?;
                let (id, idx) = k.value();
                if cur != Some(id) {
                    if let Some(prev) = cur {
                        chunked::put_tensors(&mut new_t, prev, &tensors)
                            .during(&self.path, DURING)?;
                    }
                    cur = Some(id);
                    tensors.clear();
                }
                tensors.push(
                    codec::decode_tensor(v.value())
                        .map_err(|e| self.corrupt("tensors", format!("({id}, {idx})"), e))?,
                );
            }
            if let Some(prev) = cur {
                chunked::put_tensors(&mut new_t, prev, &tensors).during(&self.path, DURING)?;
            }
            let old_e = w.open_table(EMBEDDINGS_V1).during(&self.path, DURING)?;
            let mut new_e = w.open_table(SPACE_EMBEDDINGS).during(&self.path, DURING)?;
            for item in old_e.iter().during(&self.path, DURING)? {
                let (k, v) = item.during(&self.path, DURING)?;
                let (space, id) = k.value();
                let vec = codec::decode_f32(v.value())
                    .map_err(|e| self.corrupt("embeddings", format!("({space}, {id})"), e))?;
                chunked::put_embedding(&mut new_e, space, id, &vec).during(&self.path, DURING)?;
            }
            let mut spaces = w.open_table(SPACES).during(&self.path, DURING)?;
            let mut recs = Vec::new();
            for item in spaces.iter().during(&self.path, DURING)? {
                let (k, v) = item.during(&self.path, DURING)?;
                let mut rec: SpaceRecord = serde_json::from_slice(v.value())
                    .map_err(|e| self.corrupt("spaces", k.value(), e))?;
                rec.generation = 1;
                recs.push(rec);
            }
            for rec in recs {
                spaces
                    .insert(
                        rec.id.0,
                        serde_json::to_vec(&rec).expect("serializes").as_slice(),
                    )
                    .during(&self.path, DURING)?;
            }
            let objects = w.open_table(OBJECTS).during(&self.path, DURING)?;
            let mut facts = w.open_table(OBJECT_FACTS).during(&self.path, DURING)?;
            for item in objects.iter().during(&self.path, DURING)? {
                let (k, v) = item.during(&self.path, DURING)?;
                let rec: ObjectRecord = serde_json::from_slice(v.value())
                    .map_err(|e| self.corrupt("objects", k.value(), e))?;
                facts
                    .insert(
                        k.value(),
                        codec::encode_facts(&ObjectFacts::of(&rec)).as_slice(),
                    )
                    .during(&self.path, DURING)?;
            }
            let mut meta = w.open_table(META).during(&self.path, DURING)?;
            meta.insert("change_seq", 1u64.to_le_bytes().as_slice())
                .during(&self.path, DURING)?;
            meta.insert(
                "store_uuid",
                rand::random::<u128>().to_le_bytes().as_slice(),
            )
            .during(&self.path, DURING)?;
            meta.insert("schema_version", 2u32.to_le_bytes().as_slice())
                .during(&self.path, DURING)?;
        }
        w.delete_table(TENSORS_V1).during(&self.path, DURING)?;
        w.delete_table(EMBEDDINGS_V1).during(&self.path, DURING)?;
        w.commit().during(&self.path, DURING)
    }
}
