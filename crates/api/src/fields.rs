//! String newtypes whose CRD schemas carry their own validation, so that a list such as
//! `allowedIPs` checks every item and the API server's message names the offending index.

use std::borrow::Cow;

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};

/// Longest CIDR text: a full IPv6 address with an embedded IPv4 part and `/128`.
pub const MAX_CIDR_LEN: u64 = 49;
/// `host:port`, where host may be a 253-character DNS name or `[v6]`.
pub const MAX_ENDPOINT_LEN: u64 = 261;

macro_rules! validated_string {
    ($(#[$doc:meta])* $name:ident, $schema:expr) => {
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub String);

        impl $name {
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl From<&str> for $name {
            fn from(s: &str) -> Self {
                $name(s.to_owned())
            }
        }

        impl From<String> for $name {
            fn from(s: String) -> Self {
                $name(s)
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl JsonSchema for $name {
            fn inline_schema() -> bool {
                true
            }
            fn schema_name() -> Cow<'static, str> {
                stringify!($name).into()
            }
            fn json_schema(_: &mut SchemaGenerator) -> Schema {
                $schema
            }
        }
    };
}

validated_string!(
    /// An IPv4 or IPv6 network, such as `10.244.1.0/24` or `fd00::/64`.
    CidrString,
    json_schema!({
        "type": "string",
        "maxLength": MAX_CIDR_LEN,
        "x-kubernetes-validations": [{
            "rule": "isCIDR(self)",
            "message": "must be a CIDR such as 10.0.0.0/24 or fd00::/64"
        }, {
            // A typo in the address part would otherwise be masked silently (10.0.0.1/24
            // taken for 10.0.0.0/24), as the CLI refuses it too.
            "rule": "!isCIDR(self) || cidr(self) == cidr(self).masked()",
            "message": "must be a network address without host bits, such as 10.0.0.0/24 (not 10.0.0.1/24)"
        }]
    })
);

validated_string!(
    /// A tunnel address with its prefix, as on a wg-quick `Address` line (`10.250.0.7/32`).
    InterfaceAddress,
    json_schema!({
        "type": "string",
        "maxLength": MAX_CIDR_LEN,
        "x-kubernetes-validations": [{
            "rule": "isCIDR(self)",
            "message": "must be an address with a prefix length, such as 10.250.0.2/32 or fd00::2/128"
        }]
    })
);

validated_string!(
    /// A DNS server address or a search domain, as on a wg-quick `DNS` line.
    DnsEntry,
    json_schema!({
        "type": "string",
        "maxLength": 253,
        "x-kubernetes-validations": [{
            "rule": "isIP(self) || self.matches('^([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\\\\.)*[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\\\\.?$')",
            "message": "must be an IP address or a DNS search domain"
        }]
    })
);

validated_string!(
    /// Where a peer is reached: `host:port`, `[v6]:port` or `dnsname:port`, port 1-65535.
    Endpoint,
    json_schema!({
        "type": "string",
        "maxLength": MAX_ENDPOINT_LEN,
        "x-kubernetes-validations": [{
            // Shape first (a bracketed host holds a ':', so IPv6 and never IPv4; a name is
            // RFC 1123 labels of 1-63 bytes: `wgmesh_core::validate::check_mesh_endpoint`,
            // which the controller applies too); then the port range; then a bracketed host
            // must be an IPv6 address and a host made only of digits and dots a real IPv4
            // address.
            "rule": "self.matches('^(\\\\[[0-9A-Fa-f.]*:[0-9A-Fa-f:.]*\\\\]|([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\\\\.)*[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?):[0-9]{1,5}$') && self.lastIndexOf(':') <= 253 && int(self.substring(self.lastIndexOf(':') + 1)) >= 1 && int(self.substring(self.lastIndexOf(':') + 1)) <= 65535 && (!self.startsWith('[') || isIP(self.substring(1, self.lastIndexOf(']')))) && (!self.substring(0, self.lastIndexOf(':')).matches('^[0-9.]+$') || isIP(self.substring(0, self.lastIndexOf(':'))))",
            "message": "must be host:port, [ipv6]:port or dnsname:port with a port from 1 to 65535"
        }]
    })
);

validated_string!(
    /// A Kubernetes object name (RFC 1123 subdomain).
    ObjectName,
    json_schema!({
        "type": "string",
        "minLength": 1,
        "maxLength": 253,
        "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
    })
);
