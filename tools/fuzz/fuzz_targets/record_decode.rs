//! `store::record::decode` of every record type, on raw bytes (the frame check) and on the
//! same bytes framed with a valid checksum (so bincode sees garbage bodies too). It must
//! return an error, never panic nor allocate out of proportion to the input.
#![no_main]

use libfuzzer_sys::fuzz_target;
use push_manager::store::record::{self, MessageHead, RECORD_VERSION};
use push_manager::store::{
    ArchiveProgress, DeadLetterRecord, DedupeRecord, MessageRecord, NodeRecord, RangeRecord,
    RoundIndex,
};

fn all_types(bytes: &[u8]) {
    let key = b"fuzz/key";
    let _ = record::decode::<MessageHead>(key, bytes);
    let _ = record::decode::<Vec<u8>>(key, bytes);
    let _ = record::decode::<RangeRecord>(key, bytes).map(|r| {
        // What the workers do with a decoded range must not panic either.
        let _ = r.pending().take(64).count();
        let _ = r.is_complete();
    });
    let _ = record::decode::<DeadLetterRecord>(key, bytes);
    let _ = record::decode::<NodeRecord>(key, bytes);
    let _ = record::decode::<DedupeRecord>(key, bytes);
    let _ = record::decode::<RoundIndex>(key, bytes);
    let _ = record::decode::<ArchiveProgress>(key, bytes);
    let _ = record::decode::<MessageRecord>(key, bytes);
    let _ = record::decode::<u64>(key, bytes);
    let _ = record::decode::<u32>(key, bytes);
    let _ = record::decode::<String>(key, bytes);
}

fuzz_target!(|data: &[u8]| {
    all_types(data);
    let mut framed = vec![RECORD_VERSION, 0, 0, 0, 0];
    framed.extend_from_slice(data);
    let crc = crc32c::crc32c_append(crc32c::crc32c(&framed[..1]), &framed[5..]);
    framed[1..5].copy_from_slice(&crc.to_le_bytes());
    all_types(&framed);
});
