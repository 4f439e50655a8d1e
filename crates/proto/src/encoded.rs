//! A peer as the controller sends it: its fields encoded once per peer
//! ([`wgmesh_core::desired::EncodingMemo`]) and shared by every stream that sends it, plus the
//! preshared key of the pair when there is one. On the wire it is exactly a `Peer`
//! (`encoded_tests` decodes one as such): a message is its fields in any order, so the key,
//! field 6, can follow the shared bytes.

use std::sync::Arc;

use prost::bytes::{Buf, BufMut};
use prost::encoding::{DecodeContext, WireType};

/// `Peer.preshared_key`'s field number in `mesh.proto`.
const PRESHARED_KEY_FIELD: u32 = 6;

#[derive(Clone, Default, PartialEq)]
pub struct EncodedPeer {
    /// Every field but the preshared key, encoded.
    shared: Arc<[u8]>,
    /// The pair's preshared key, encoded after the shared bytes.
    preshared_key: Option<[u8; 32]>,
}

impl EncodedPeer {
    pub fn new(shared: Arc<[u8]>, preshared_key: Option<[u8; 32]>) -> Self {
        EncodedPeer {
            shared,
            preshared_key,
        }
    }
}

/// The preshared key is a secret: it shows only as present or not, like `Peer`'s.
impl std::fmt::Debug for EncodedPeer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EncodedPeer")
            .field("shared_bytes", &self.shared.len())
            .field(
                "preshared_key",
                &format_args!(
                    "{}",
                    if self.preshared_key.is_some() {
                        "<redacted>"
                    } else {
                        "<none>"
                    }
                ),
            )
            .finish()
    }
}

impl prost::Message for EncodedPeer {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        buf.put_slice(&self.shared);
        if let Some(key) = &self.preshared_key {
            prost::encoding::encode_key(PRESHARED_KEY_FIELD, WireType::LengthDelimited, buf);
            prost::encoding::encode_varint(key.len() as u64, buf);
            buf.put_slice(key);
        }
    }

    /// The controller only sends updates; what it would decode is skipped.
    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), prost::DecodeError> {
        prost::encoding::skip_field(wire_type, tag, buf, ctx)
    }

    fn encoded_len(&self) -> usize {
        self.shared.len()
            + self.preshared_key.map_or(0, |key| {
                prost::encoding::key_len(PRESHARED_KEY_FIELD)
                    + prost::encoding::encoded_len_varint(key.len() as u64)
                    + key.len()
            })
    }

    fn clear(&mut self) {
        *self = EncodedPeer::default();
    }
}
