//! `store::record::decode_pack`: a head and continuation chunks cut from the input, with a
//! length that matches the chunks (so the messages are decoded) or not, ending at a small
//! sequence (so a pack too long for it is met too).
#![no_main]

use libfuzzer_sys::fuzz_target;
use push_manager::store::record::{self, MessageHead};

fuzz_target!(|data: &[u8]| {
    let Some((&ctl, rest)) = data.split_first() else {
        return;
    };
    // Low 2 bits: continuation chunks; bit 2: lie about the length; bit 3: a chunk error;
    // high 4 bits: the pack's last sequence.
    let pieces = usize::from(ctl & 3) + 1;
    let step = rest.len() / pieces;
    let mut chunks: Vec<Vec<u8>> = (0..pieces)
        .map(|i| {
            let end = if i + 1 == pieces {
                rest.len()
            } else {
                (i + 1) * step
            };
            rest[i * step..end].to_vec()
        })
        .collect();
    let body = chunks.remove(0);
    let total: u64 = rest.len() as u64;
    let head = MessageHead {
        chunks: pieces as u32,
        len: if ctl & 4 != 0 {
            total ^ u64::from(ctl) << 8
        } else {
            total
        },
        body,
    };
    let fail = ctl & 8 != 0;
    let rest = chunks.into_iter().enumerate().map(|(i, c)| {
        if fail && i == 0 {
            Err(push_manager::store::StoreError::Corrupt {
                key: "m/fuzz".into(),
                reason: "missing".into(),
            })
        } else {
            Ok(c)
        }
    });
    let _ = record::decode_pack(b"m/fuzz", u64::from(ctl >> 4), head, rest);
});
