//! Reasons of the `Ready` condition of wgmesh objects: the one list, so the controller writing
//! them and the CLI reading them back cannot drift apart.

use std::fmt;
use std::str::FromStr;

/// Why an object is or is not `Ready`. The strings (see [`Reason::as_str`]) are API: they are
/// written to `status.conditions[].reason` in `UpperCamelCase` as Kubernetes conventions ask,
/// and must never change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    // Peer reasons.
    /// Ready: the peer is accepted and in the peer set sent to every member node (an agent
    /// that refuses an update says so in an Event and its metrics).
    Programmed,
    /// The spec failed a check the API server cannot make (e.g. an unparsable field, or a
    /// preshared-key Secret whose value looks like a key but is none).
    InvalidSpec,
    /// The peer's `spec.mesh` names no WireGuardMesh.
    MeshNotFound,
    /// `spec.disabled` is true.
    Disabled,
    /// A node peer whose Node does not exist or is not selected by the mesh.
    NodeNotInMesh,
    /// A node peer not made by the controller (a user-made object claiming a Node).
    NodePeerNotOwned,
    /// Another peer already has this public key.
    DuplicatePublicKey,
    /// The preshared-key Secret (or its key) does not exist yet.
    PresharedKeySecretMissing,
    /// No free address left in the mesh's tunnel pool.
    TunnelPoolExhausted,
    /// The peer has not been judged yet (a controller that has not computed its mesh since it
    /// started); the computation allocates its tunnel address.
    TunnelAddressPending,
    /// Allowed IPs overlap another peer's, a pod CIDR or the tunnel pool (or the endpoint is
    /// an address in the tunnel pool, or, without a mesh fwmark, inside another peer's claim).
    AllowedIpsOverlap,
    /// Allowed IPs claim a cluster range no peer may route (Service CIDR, API server ...), or
    /// the endpoint is an address no gateway may be sent to (loopback, link-local, multicast).
    ReservedRange,
    /// A client peer has no gateway node to reach the mesh through.
    NoGateway,
    // Mesh reasons.
    /// Ready: every node and external peer of the mesh is programmed.
    AllPeersProgrammed,
    /// Some peer of the mesh is not programmed.
    PeersNotReady,
    /// No node is a member of the mesh (none selected, or no agent registered yet).
    NoMembers,
    /// A tunnel pool overlaps what the nodes need (a reserved range, a Node's address or pod
    /// CIDR) or is too small for two nodes: the mesh is held as it is until it is fixed.
    InvalidTunnelPool,
    /// An older mesh selects one of its nodes with the same interface, port or an
    /// overlapping pool: the mesh is held as it is until the conflict is gone.
    MeshConflict,
    /// Something the mesh depends on has not been read yet (a Secret, the pod CIDR source):
    /// the mesh is held as it is meanwhile.
    MeshHeld,
}

impl Reason {
    /// Every reason, for tables and parsing.
    pub const ALL: [Reason; 19] = [
        Reason::Programmed,
        Reason::InvalidSpec,
        Reason::MeshNotFound,
        Reason::Disabled,
        Reason::NodeNotInMesh,
        Reason::NodePeerNotOwned,
        Reason::DuplicatePublicKey,
        Reason::PresharedKeySecretMissing,
        Reason::TunnelPoolExhausted,
        Reason::TunnelAddressPending,
        Reason::AllowedIpsOverlap,
        Reason::ReservedRange,
        Reason::NoGateway,
        Reason::AllPeersProgrammed,
        Reason::PeersNotReady,
        Reason::NoMembers,
        Reason::InvalidTunnelPool,
        Reason::MeshConflict,
        Reason::MeshHeld,
    ];

    /// The string written to the API.
    pub const fn as_str(self) -> &'static str {
        match self {
            Reason::Programmed => "Programmed",
            Reason::InvalidSpec => "InvalidSpec",
            Reason::MeshNotFound => "MeshNotFound",
            Reason::Disabled => "Disabled",
            Reason::NodeNotInMesh => "NodeNotInMesh",
            Reason::NodePeerNotOwned => "NodePeerNotOwned",
            Reason::DuplicatePublicKey => "DuplicatePublicKey",
            Reason::PresharedKeySecretMissing => "PresharedKeySecretMissing",
            Reason::TunnelPoolExhausted => "TunnelPoolExhausted",
            Reason::TunnelAddressPending => "TunnelAddressPending",
            Reason::AllowedIpsOverlap => "AllowedIPsOverlap",
            Reason::ReservedRange => "ReservedRange",
            Reason::NoGateway => "NoGateway",
            Reason::AllPeersProgrammed => "AllPeersProgrammed",
            Reason::PeersNotReady => "PeersNotReady",
            Reason::NoMembers => "NoMembers",
            Reason::InvalidTunnelPool => "InvalidTunnelPool",
            Reason::MeshConflict => "MeshConflict",
            Reason::MeshHeld => "MeshHeld",
        }
    }

    /// Whether the reason goes away by itself, without anyone changing an object: waiting
    /// (e.g. `kubectl wgmesh peer add --wait`) makes sense only for these.
    ///
    /// - `TunnelAddressPending`: the next computation of the mesh allocates the address.
    /// - `PresharedKeySecretMissing`: the Secret is commonly created right after the peer
    ///   (by the same `kubectl apply`, or by a secret operator).
    /// - `MeshHeld`: the controller reads what it waits for.
    ///
    /// Every other reason needs a person to change a spec, a Node or the mesh (pools do not
    /// grow, overlaps and duplicates do not resolve themselves), and the Ready ones are final.
    pub const fn is_transient(self) -> bool {
        matches!(
            self,
            Reason::TunnelAddressPending | Reason::PresharedKeySecretMissing | Reason::MeshHeld
        )
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A condition reason that is none of [`Reason`]'s (e.g. written by a newer controller).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown Ready condition reason {0:?}")]
pub struct UnknownReason(pub String);

impl FromStr for Reason {
    type Err = UnknownReason;

    /// Exact, case-sensitive: the API strings are fixed.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Reason::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| UnknownReason(s.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The API strings, written out: changing one is a breaking API change.
    const TABLE: &[(Reason, &str, bool)] = &[
        (Reason::Programmed, "Programmed", false),
        (Reason::InvalidSpec, "InvalidSpec", false),
        (Reason::MeshNotFound, "MeshNotFound", false),
        (Reason::Disabled, "Disabled", false),
        (Reason::NodeNotInMesh, "NodeNotInMesh", false),
        (Reason::NodePeerNotOwned, "NodePeerNotOwned", false),
        (Reason::DuplicatePublicKey, "DuplicatePublicKey", false),
        (
            Reason::PresharedKeySecretMissing,
            "PresharedKeySecretMissing",
            true,
        ),
        (Reason::TunnelPoolExhausted, "TunnelPoolExhausted", false),
        (Reason::TunnelAddressPending, "TunnelAddressPending", true),
        (Reason::AllowedIpsOverlap, "AllowedIPsOverlap", false),
        (Reason::ReservedRange, "ReservedRange", false),
        (Reason::NoGateway, "NoGateway", false),
        (Reason::AllPeersProgrammed, "AllPeersProgrammed", false),
        (Reason::PeersNotReady, "PeersNotReady", false),
        (Reason::NoMembers, "NoMembers", false),
        (Reason::InvalidTunnelPool, "InvalidTunnelPool", false),
        (Reason::MeshConflict, "MeshConflict", false),
        (Reason::MeshHeld, "MeshHeld", true),
    ];

    #[test]
    fn every_reason_round_trips_with_its_api_string() {
        assert_eq!(TABLE.len(), Reason::ALL.len(), "a reason is missing here");
        for &(reason, s, transient) in TABLE {
            assert_eq!(reason.as_str(), s);
            assert_eq!(reason.to_string(), s);
            assert_eq!(s.parse::<Reason>(), Ok(reason));
            assert_eq!(reason.is_transient(), transient, "{s}");
        }
    }

    #[test]
    fn unknown_and_miscased_strings_are_refused() {
        for s in [
            "",
            "programmed",
            "AllowedIpsOverlap",
            "KeyChanged",
            " Programmed",
        ] {
            assert_eq!(s.parse::<Reason>(), Err(UnknownReason(s.into())), "{s:?}");
        }
    }
}
