//! The agent's netfilter rules, in one nftables table of its own (`inet wgmesh`, IPv4 and
//! IPv6 alike), written over netlink (`NETLINK_NETFILTER`) in one atomic batch: the node needs
//! no nft or iptables binary, and the table is replaced whole, never edited.
//!
//! - **Pod egress** (CNI mode): pods reach addresses outside the cluster with the node's
//!   address as their source (the world has no route back to pod CIDRs), as kindnet and other
//!   CNIs do. A NAT chain at the postrouting hook: packets leaving through the tunnel or the
//!   pods' bridge keep their pod source (the mesh and the node's own pods route pod
//!   addresses), anything else from the node's pod CIDRs is masqueraded. Which packets leave
//!   where is the routing table's decision, so the rules never change with peers.
//! - **TCP MSS clamping** on the tunnel: a TCP handshake crossing the tunnel (in either
//!   direction) gets its maximum segment size lowered to what fits the tunnel's MTU, so a
//!   pod whose own interface is larger (add-on mode: the other CNI's 1500 bytes) never sends
//!   segments that need path MTU discovery, which black-holes wherever ICMP is filtered.
//! - **The control connection outside the tunnel** (host encryption): agents reach the
//!   controller over the underlay with the mesh's mark on their socket (TLS protects that
//!   channel, as it does the API server's), so a node whose tunnels are stale (a preshared key
//!   or a peer key it missed while down) can still learn the new ones. Every other node's
//!   address is routed into the tunnel, so the mark must survive kube-proxy, which ORs its
//!   masquerade bit into it when it translates the Service IP, and the controller's replies
//!   need it too: both connections are marked in conntrack, and after NAT their packets get
//!   the mesh's mark back, which routes them past the tunnel's table.

use std::time::Duration;

use ipnet::IpNet;
use netlink_packet_core::{
    DefaultNla, NLM_F_ACK, NLM_F_APPEND, NLM_F_CREATE, NLM_F_REQUEST, NetlinkMessage,
    NetlinkPayload,
};
use netlink_packet_netfilter::nftables::{
    Bitwise, ChainAttribute, ChainMessage, Cmp, DataAttribute, Expressions, Hook, Immediate,
    InetHookNumber, Meta, MetaKey, NfTablesMessage, Operator, Payload, Register, RuleAttribute,
    RuleMessage, TableAttribute, TableMessage, Verdict, VerdictAttribute,
};
use netlink_packet_netfilter::none::ControlMessage;
use netlink_packet_netfilter::{NetfilterHeader, NetfilterMessage, NetfilterProtoFamily};

/// Our table (family `inet`: IPv4 and IPv6 alike).
pub const TABLE: &str = "wgmesh";
const EGRESS_CHAIN: &str = "pod-egress";
const MSS_CHAIN: &str = "mss-clamp";
const CONTROLLER_IN_CHAIN: &str = "controller-in";
const CONTROLLER_OWN_CHAIN: &str = "controller-own";
const CONTROLLER_OUT_CHAIN: &str = "controller-out";
const CONTROLLER_NAT_CHAIN: &str = "controller-nat";
/// nftables' `srcnat` priority, where masquerading belongs.
const SRCNAT_PRIORITY: i32 = 100;
/// nftables' `mangle` priority, where packets are rewritten.
const MANGLE_PRIORITY: i32 = -150;
/// Just after `dstnat` (-100), where kube-proxy translates Service IPs and marks packets.
const AFTER_DSTNAT_PRIORITY: i32 = -90;
/// `NFT_PAYLOAD_TRANSPORT_HEADER`.
const TRANSPORT_HEADER: u32 = 2;
const IPPROTO_TCP: u8 = 6;
/// TCP flags SYN and RST: a segment with SYN and without RST opens a connection.
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
/// The `exthdr` expression's attributes (`NFTA_EXTHDR_*`) and the TCP option it edits.
const EXTHDR_DREG: u16 = 1;
const EXTHDR_TYPE: u16 = 2;
const EXTHDR_OFFSET: u16 = 3;
const EXTHDR_LEN: u16 = 4;
const EXTHDR_OP: u16 = 6;
const EXTHDR_SREG: u16 = 7;
const EXTHDR_OP_TCPOPT: u32 = 1;
const TCPOPT_MAXSEG: u8 = 2;
/// `NFT_REG_1`, as the `exthdr` attributes carry it.
const REG_1: u32 = 1;
const NFPROTO_IPV4: u8 = 2;
const NFPROTO_IPV6: u8 = 10;
/// The `ct` expression's attributes (`NFTA_CT_*`) and its key for the connection's mark.
const CT_DREG: u16 = 1;
const CT_KEY: u16 = 2;
const CT_SREG: u16 = 4;
const NFT_CT_STATUS: u32 = 2;
const NFT_CT_MARK: u32 = 3;
/// `IPS_DST_NAT`: the connection's destination was translated (a Service IP).
const IPS_DST_NAT: u32 = 1 << 5;
/// `NFT_PAYLOAD_NETWORK_HEADER`.
const NETWORK_HEADER: u32 = 1;
const IFNAMSIZ: usize = 16;
const NFNL_SUBSYS_NFTABLES: u16 = 10;

/// The node's rules; the table exists only while one of them is wanted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeRules {
    pub egress: Option<Egress>,
    pub mss_clamp: Option<MssClamp>,
    pub controller_connections: Option<ControllerConnections>,
}

impl NodeRules {
    fn is_empty(&self) -> bool {
        self.egress.is_none() && self.mss_clamp.is_none() && self.controller_connections.is_none()
    }
}

/// The connections between agents and the controller, outside the tunnel: this agent's own
/// (its socket carries `mark`) and those that reach the controller's `port` on this host
/// without coming through the `tunnel` interface. Their packets leave with exactly `mark`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControllerConnections {
    pub port: u16,
    pub mark: u32,
    pub tunnel: String,
}

/// TCP handshakes through `interface` get an MSS that fits its `mtu`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MssClamp {
    pub interface: String,
    pub mtu: u32,
}

/// What the egress rules are made of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Egress {
    /// The node's pod CIDRs: the sources masqueraded.
    pub pod_cidrs: Vec<IpNet>,
    /// Interfaces whose traffic keeps its pod source: the tunnel and the pods' bridge.
    pub keep_source_via: Vec<String>,
}

/// The batch that makes the table exactly `rules` (or removes it, for `None` or no rules):
/// creating the table first makes the delete valid whether or not it exists, and the kernel
/// applies the whole batch or none of it, so there is never a moment without the rules.
pub fn batch(rules: Option<&NodeRules>) -> Vec<NetlinkMessage<NetfilterMessage>> {
    let mut messages = vec![
        control(ControlMessage::BatchBegin),
        nft(NfTablesMessage::NewTable(table()), NLM_F_CREATE),
        nft(NfTablesMessage::DeleteTable(table()), 0),
    ];
    if let Some(rules) = rules.filter(|r| !r.is_empty()) {
        messages.push(nft(NfTablesMessage::NewTable(table()), NLM_F_CREATE));
        if let Some(egress) = &rules.egress {
            messages.extend(egress_rules(egress));
        }
        if let Some(clamp) = &rules.mss_clamp {
            messages.extend(mss_rules(clamp));
        }
        if let Some(replies) = &rules.controller_connections {
            messages.extend(controller_connection_rules(replies));
        }
    }
    messages.push(control(ControlMessage::BatchEnd));
    for (seq, message) in messages.iter_mut().enumerate() {
        message.header.sequence_number = seq as u32 + 1;
    }
    messages
}

/// A base chain of our table at `hook`.
fn chain(
    name: &str,
    kind: &str,
    hook: InetHookNumber,
    priority: i32,
) -> NetlinkMessage<NetfilterMessage> {
    nft(
        NfTablesMessage::NewChain(ChainMessage {
            attributes: vec![
                ChainAttribute::Table(TABLE.into()),
                ChainAttribute::Name(name.into()),
                ChainAttribute::Hook(vec![
                    Hook::Number(hook.into()),
                    Hook::Priority(priority as u32),
                ]),
                ChainAttribute::Type(kind.into()),
                // NF_ACCEPT: what no rule acts on passes unchanged.
                ChainAttribute::Policy(1),
            ],
        }),
        NLM_F_CREATE,
    )
}

fn egress_rules(egress: &Egress) -> Vec<NetlinkMessage<NetfilterMessage>> {
    let mut messages = vec![chain(
        EGRESS_CHAIN,
        "nat",
        InetHookNumber::PostRouting,
        SRCNAT_PRIORITY,
    )];
    for interface in &egress.keep_source_via {
        messages.push(rule(
            EGRESS_CHAIN,
            vec![
                Expressions::Meta(vec![
                    Meta::Key(MetaKey::Oifname),
                    Meta::DestinationRegister(Register::Reg1),
                ]),
                equal(interface_name(interface)),
                verdict(Verdict::Return),
            ],
        ));
    }
    for cidr in &egress.pod_cidrs {
        let (family, offset, net, mask) = match cidr.trunc() {
            IpNet::V4(n) => (
                NFPROTO_IPV4,
                12,
                n.network().octets().to_vec(),
                n.netmask().octets().to_vec(),
            ),
            IpNet::V6(n) => (
                NFPROTO_IPV6,
                8,
                n.network().octets().to_vec(),
                n.netmask().octets().to_vec(),
            ),
        };
        let len = net.len() as u32;
        messages.push(rule(
            EGRESS_CHAIN,
            vec![
                Expressions::Meta(vec![
                    Meta::Key(MetaKey::Nfproto),
                    Meta::DestinationRegister(Register::Reg1),
                ]),
                equal(vec![family]),
                Expressions::Payload(vec![
                    Payload::DestinationRegister(Register::Reg1),
                    Payload::Base(NETWORK_HEADER),
                    Payload::Offset(offset),
                    Payload::Len(len),
                ]),
                Expressions::Bitwise(vec![
                    Bitwise::SourceRegister(Register::Reg1),
                    Bitwise::DestinationRegister(Register::Reg1),
                    Bitwise::Length(len),
                    Bitwise::Mask(DataAttribute::Value(mask)),
                    Bitwise::Xor(DataAttribute::Value(vec![0; len as usize])),
                ]),
                equal(net),
                masquerade(),
            ],
        ));
    }
    messages
}

/// For each family and direction through the tunnel: a TCP segment opening a connection
/// (SYN without RST) whose MSS option is above what fits gets it lowered (the kernel fixes
/// the checksum).
fn mss_rules(clamp: &MssClamp) -> Vec<NetlinkMessage<NetfilterMessage>> {
    let mut messages = vec![chain(
        MSS_CHAIN,
        "filter",
        InetHookNumber::Forward,
        MANGLE_PRIORITY,
    )];
    // IP and TCP headers without options: 20 + 20 bytes, IPv6's 40 + 20.
    for (family, headers) in [(NFPROTO_IPV4, 40u32), (NFPROTO_IPV6, 60)] {
        let mss = clamp
            .mtu
            .saturating_sub(headers)
            .clamp(536, u16::MAX.into()) as u16;
        for direction in [MetaKey::Oifname, MetaKey::Iifname] {
            messages.push(rule(
                MSS_CHAIN,
                vec![
                    load_meta(direction),
                    equal(interface_name(&clamp.interface)),
                    load_meta(MetaKey::Nfproto),
                    equal(vec![family]),
                    load_meta(MetaKey::L4Proto),
                    equal(vec![IPPROTO_TCP]),
                    Expressions::Payload(vec![
                        Payload::DestinationRegister(Register::Reg1),
                        Payload::Base(TRANSPORT_HEADER),
                        Payload::Offset(13),
                        Payload::Len(1),
                    ]),
                    Expressions::Bitwise(vec![
                        Bitwise::SourceRegister(Register::Reg1),
                        Bitwise::DestinationRegister(Register::Reg1),
                        Bitwise::Length(1),
                        Bitwise::Mask(DataAttribute::Value(vec![TCP_SYN | TCP_RST])),
                        Bitwise::Xor(DataAttribute::Value(vec![0])),
                    ]),
                    equal(vec![TCP_SYN]),
                    mss_option(EXTHDR_DREG),
                    Expressions::Cmp(vec![
                        Cmp::SourceRegister(Register::Reg1),
                        Cmp::Op(Operator::GreaterThan),
                        Cmp::Data(DataAttribute::Value(mss.to_be_bytes().to_vec())),
                    ]),
                    Expressions::Immediate(vec![
                        Immediate::DestinationRegister(Register::Reg1),
                        Immediate::Data(DataAttribute::Value(mss.to_be_bytes().to_vec())),
                    ]),
                    mss_option(EXTHDR_SREG),
                ],
            ));
        }
    }
    messages
}

/// Four base chains. At the input hook, a TCP connection to the controller's port that did
/// not arrive through the tunnel gets the mark in conntrack; at the output hook before NAT,
/// so does a TCP connection whose packets carry exactly the mark (the agent's own). After NAT
/// (a `route` chain, so the kernel routes a packet again when its mark changes), TCP of a
/// connection so marked gets exactly the mark again, which the `not fwmark` rule sends past
/// our table: whatever kube-proxy ORed into it (`0x4000`, to masquerade) is gone, and the
/// replies of the controller's port are marked as their requests came. At postrouting, the
/// agent's own new connections to a translated address are masqueraded, as kube-proxy would
/// have.
fn controller_connection_rules(
    connections: &ControllerConnections,
) -> Vec<NetlinkMessage<NetfilterMessage>> {
    let mark = connections.mark.to_ne_bytes().to_vec();
    let tcp = || [load_meta(MetaKey::L4Proto), equal(vec![IPPROTO_TCP])];
    let mut incoming = tcp().to_vec();
    incoming.extend([
        Expressions::Payload(vec![
            Payload::DestinationRegister(Register::Reg1),
            Payload::Base(TRANSPORT_HEADER),
            Payload::Offset(2),
            Payload::Len(2),
        ]),
        equal(connections.port.to_be_bytes().to_vec()),
        load_meta(MetaKey::Iifname),
        not_equal(interface_name(&connections.tunnel)),
        load(mark.clone()),
        ct_mark(CT_SREG),
    ]);
    let mut own = tcp().to_vec();
    own.extend([
        load_meta(MetaKey::Mark),
        equal(mark.clone()),
        ct_mark(CT_SREG),
    ]);
    let mut outgoing = tcp().to_vec();
    outgoing.extend([
        ct_mark(CT_DREG),
        equal(mark.clone()),
        load(mark.clone()),
        Expressions::Meta(vec![
            Meta::Key(MetaKey::Mark),
            Meta::SourceRegister(Register::Reg1),
        ]),
    ]);
    // kube-proxy masquerades what it marked; with its bit gone, this does it instead for the
    // agent's own connections it translated (new ones: the controller's replies are not), so
    // a node whose default route and other nodes' addresses are on different links sends its
    // own address. An untranslated connection keeps the source its route chose.
    let mut translated = tcp().to_vec();
    translated.extend([
        ct_mark(CT_DREG),
        equal(mark.clone()),
        load_meta(MetaKey::Mark),
        equal(mark.clone()),
        ct(NFT_CT_STATUS, CT_DREG),
        Expressions::Bitwise(vec![
            Bitwise::SourceRegister(Register::Reg1),
            Bitwise::DestinationRegister(Register::Reg1),
            Bitwise::Length(4),
            Bitwise::Mask(DataAttribute::Value(IPS_DST_NAT.to_ne_bytes().to_vec())),
            Bitwise::Xor(DataAttribute::Value(vec![0; 4])),
        ]),
        not_equal(vec![0; 4]),
        load_meta(MetaKey::Oifname),
        not_equal(interface_name("lo")),
        masquerade(),
    ]);
    vec![
        chain(
            CONTROLLER_IN_CHAIN,
            "filter",
            InetHookNumber::LocalIn,
            MANGLE_PRIORITY,
        ),
        rule(CONTROLLER_IN_CHAIN, incoming),
        chain(
            CONTROLLER_OWN_CHAIN,
            "filter",
            InetHookNumber::LocalOut,
            MANGLE_PRIORITY,
        ),
        rule(CONTROLLER_OWN_CHAIN, own),
        chain(
            CONTROLLER_OUT_CHAIN,
            "route",
            InetHookNumber::LocalOut,
            AFTER_DSTNAT_PRIORITY,
        ),
        rule(CONTROLLER_OUT_CHAIN, outgoing),
        chain(
            CONTROLLER_NAT_CHAIN,
            "nat",
            InetHookNumber::PostRouting,
            SRCNAT_PRIORITY,
        ),
        rule(CONTROLLER_NAT_CHAIN, translated),
    ]
}

/// The connection's mark, read into (`CT_DREG`) or written from (`CT_SREG`) register 1.
fn ct_mark(register: u16) -> Expressions {
    ct(NFT_CT_MARK, register)
}

/// Conntrack's `key`, read into (`CT_DREG`) or written from (`CT_SREG`) register 1.
fn ct(key: u32, register: u16) -> Expressions {
    Expressions::Other {
        expression_type: "ct".into(),
        attributes: vec![
            DefaultNla::new(CT_KEY, key.to_be_bytes().to_vec()),
            DefaultNla::new(register, REG_1.to_be_bytes().to_vec()),
        ],
    }
}

/// `data` into register 1.
fn load(data: Vec<u8>) -> Expressions {
    Expressions::Immediate(vec![
        Immediate::DestinationRegister(Register::Reg1),
        Immediate::Data(DataAttribute::Value(data)),
    ])
}

fn load_meta(key: MetaKey) -> Expressions {
    Expressions::Meta(vec![
        Meta::Key(key),
        Meta::DestinationRegister(Register::Reg1),
    ])
}

/// The TCP MSS option's value, read into (`EXTHDR_DREG`) or written from (`EXTHDR_SREG`)
/// register 1. nf_tables attributes are big-endian.
fn mss_option(register: u16) -> Expressions {
    let be32 = |v: u32| v.to_be_bytes().to_vec();
    Expressions::Other {
        expression_type: "exthdr".into(),
        attributes: vec![
            DefaultNla::new(register, be32(REG_1)),
            DefaultNla::new(EXTHDR_TYPE, vec![TCPOPT_MAXSEG]),
            DefaultNla::new(EXTHDR_OFFSET, be32(2)),
            DefaultNla::new(EXTHDR_LEN, be32(2)),
            DefaultNla::new(EXTHDR_OP, be32(EXTHDR_OP_TCPOPT)),
        ],
    }
}

fn table() -> TableMessage {
    TableMessage {
        attributes: vec![TableAttribute::Name(TABLE.into())],
    }
}

fn rule(chain: &str, expressions: Vec<Expressions>) -> NetlinkMessage<NetfilterMessage> {
    nft(
        NfTablesMessage::NewRule(RuleMessage {
            attributes: vec![
                RuleAttribute::Table(TABLE.into()),
                RuleAttribute::Chain(chain.into()),
                RuleAttribute::Expressions(expressions.into_iter().map(Into::into).collect()),
            ],
        }),
        NLM_F_CREATE | NLM_F_APPEND,
    )
}

fn equal(data: Vec<u8>) -> Expressions {
    compare(Operator::Equal, data)
}

fn not_equal(data: Vec<u8>) -> Expressions {
    compare(Operator::NotEqual, data)
}

/// Register 1 compared with `data`.
fn compare(op: Operator, data: Vec<u8>) -> Expressions {
    Expressions::Cmp(vec![
        Cmp::SourceRegister(Register::Reg1),
        Cmp::Op(op),
        Cmp::Data(DataAttribute::Value(data)),
    ])
}

/// Source NAT to the outgoing interface's address.
fn masquerade() -> Expressions {
    Expressions::Other {
        expression_type: "masq".into(),
        attributes: vec![],
    }
}

fn verdict(code: Verdict) -> Expressions {
    Expressions::Immediate(vec![
        Immediate::DestinationRegister(Register::Verdict),
        Immediate::Data(DataAttribute::Verdict(vec![VerdictAttribute::Code(code)])),
    ])
}

/// An interface name as nftables compares it: the name and its terminating NUL, padded to
/// IFNAMSIZ (an exact match, not a prefix).
fn interface_name(name: &str) -> Vec<u8> {
    let mut bytes = name.as_bytes()[..name.len().min(IFNAMSIZ - 1)].to_vec();
    bytes.resize(IFNAMSIZ, 0);
    bytes
}

fn nft(message: NfTablesMessage, flags: u16) -> NetlinkMessage<NetfilterMessage> {
    let mut m = NetlinkMessage::from(NetfilterMessage::new(
        NetfilterHeader::new(NetfilterProtoFamily::Inet, 0, 0),
        message,
    ));
    m.header.flags = NLM_F_REQUEST | NLM_F_ACK | flags;
    m
}

fn control(message: ControlMessage) -> NetlinkMessage<NetfilterMessage> {
    let mut m = NetlinkMessage::from(NetfilterMessage::new(
        NetfilterHeader::new(NetfilterProtoFamily::Unspec, 0, NFNL_SUBSYS_NFTABLES),
        message,
    ));
    m.header.flags = NLM_F_REQUEST;
    m
}

/// Why the kernel refused the batch.
#[derive(Debug, thiserror::Error)]
pub enum NetfilterError {
    #[error("netfilter socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("the kernel refused the node's nftables rules (message {sequence}): {message}")]
    Refused { sequence: u32, message: String },
    #[error("no answer from the kernel's netfilter in time")]
    Timeout,
}

/// Makes the node's table exactly `rules` (`None`: removes it).
pub async fn apply(rules: Option<&NodeRules>) -> Result<(), NetfilterError> {
    use netlink_sys::{AsyncSocket, AsyncSocketExt, TokioSocket, protocols::NETLINK_NETFILTER};
    let messages = batch(rules);
    let mut buffer = Vec::new();
    for m in &messages {
        let mut m = m.clone();
        m.finalize();
        let start = buffer.len();
        buffer.resize(start + m.buffer_len(), 0);
        m.serialize(&mut buffer[start..]);
    }
    // Every message between the batch's ends asks for an answer.
    let mut waiting: std::collections::BTreeSet<u32> = messages[1..messages.len() - 1]
        .iter()
        .map(|m| m.header.sequence_number)
        .collect();
    let mut socket = TokioSocket::new(NETLINK_NETFILTER)?;
    socket.socket_mut().bind_auto()?;
    socket
        .socket_mut()
        .connect(&netlink_sys::SocketAddr::new(0, 0))?;
    socket.send(&buffer).await?;
    let answers = async {
        let mut refused = None;
        while !waiting.is_empty() {
            let (data, _) = socket.recv_from_full().await?;
            let mut at = 0;
            while at < data.len() {
                let Ok(reply) = NetlinkMessage::<NetfilterMessage>::deserialize(&data[at..]) else {
                    break;
                };
                let len = reply.header.length as usize;
                if let NetlinkPayload::Error(e) = &reply.payload {
                    let sequence = reply.header.sequence_number;
                    waiting.remove(&sequence);
                    if let Some(code) = e.code
                        && refused.is_none()
                    {
                        let error = std::io::Error::from_raw_os_error(-code.get());
                        refused = Some(NetfilterError::Refused {
                            sequence,
                            message: error.to_string(),
                        });
                    }
                }
                if len == 0 {
                    break;
                }
                at += len;
            }
            if refused.is_some() {
                // The batch is all or nothing: the first refusal is the answer.
                break;
            }
        }
        refused.map_or(Ok(()), Err)
    };
    tokio::time::timeout(Duration::from_secs(5), answers)
        .await
        .map_err(|_| NetfilterError::Timeout)?
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_core::{Emitable, NetlinkBuffer, Parseable};

    fn egress(cidrs: &[&str]) -> Egress {
        Egress {
            pod_cidrs: cidrs.iter().map(|c| c.parse().unwrap()).collect(),
            keep_source_via: vec!["wgmesh0".into(), "wgmesh-br0".into()],
        }
    }

    fn only(egress: Egress) -> NodeRules {
        NodeRules {
            egress: Some(egress),
            ..Default::default()
        }
    }

    fn clamp(mtu: u32) -> MssClamp {
        MssClamp {
            interface: "wgmesh0".into(),
            mtu,
        }
    }

    #[test]
    fn mss_rules_for_both_families_and_directions() {
        let rules = NodeRules {
            egress: None,
            mss_clamp: Some(clamp(1420)),
            ..Default::default()
        };
        let b = batch(Some(&rules));
        assert_eq!(
            kinds(&b),
            [
                "BatchBegin",
                "NewTable",
                "DeleteTable",
                "NewTable",
                "NewChain",
                "NewRule",
                "NewRule",
                "NewRule",
                "NewRule",
                "BatchEnd"
            ]
        );
        // 1420 - 40 = 1380 = 0x0564 for IPv4, 1420 - 60 = 1360 = 0x0550 for IPv6.
        let v4 = format!("{:?}", b[5]);
        assert!(
            v4.contains("Value([5, 100])") && v4.contains("Value([2])"),
            "{v4}"
        );
        assert!(
            v4.contains("\"exthdr\"") && v4.contains("GreaterThan"),
            "{v4}"
        );
        let v6 = format!("{:?}", b[8]);
        assert!(
            v6.contains("Value([5, 80])") && v6.contains("Value([10])"),
            "{v6}"
        );
        // A tiny MTU never asks for less than the IPv4 minimum.
        let tiny = format!(
            "{:?}",
            batch(Some(&NodeRules {
                egress: None,
                mss_clamp: Some(clamp(500)),
                ..Default::default()
            }))[5]
        );
        assert!(tiny.contains("Value([2, 24])"), "536: {tiny}");
        // No rules at all: the table goes.
        assert_eq!(
            kinds(&batch(Some(&NodeRules::default()))),
            kinds(&batch(None))
        );
    }

    fn kinds(batch: &[NetlinkMessage<NetfilterMessage>]) -> Vec<String> {
        batch
            .iter()
            .map(|m| match &m.payload {
                NetlinkPayload::InnerMessage(inner) => {
                    let text = format!("{:?}", inner.inner);
                    // `NfTables(NewTable(..))`, `None(BatchBegin)`: the inner variant.
                    text.split(['(', ')', ' ', '{'])
                        .filter(|w| !w.is_empty())
                        .nth(1)
                        .unwrap()
                        .to_owned()
                }
                other => format!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn the_batch_replaces_the_table_whole_or_removes_it() {
        let remove = kinds(&batch(None));
        assert_eq!(
            remove,
            ["BatchBegin", "NewTable", "DeleteTable", "BatchEnd"],
            "removing: create then delete, valid whether or not the table exists"
        );
        let dual = kinds(&batch(Some(&only(egress(&[
            "10.244.1.0/24",
            "fd00:10:244:1::/64",
        ])))));
        assert_eq!(
            dual,
            [
                "BatchBegin",
                "NewTable",
                "DeleteTable",
                "NewTable",
                "NewChain",
                "NewRule",
                "NewRule",
                "NewRule",
                "NewRule",
                "BatchEnd"
            ],
            "two keep-source rules, then one masquerade rule per pod CIDR"
        );
    }

    #[test]
    fn every_message_encodes_and_decodes_with_its_own_sequence() {
        let messages = batch(Some(&NodeRules {
            egress: Some(egress(&["10.244.1.0/24", "fd00:10:244:1::/64"])),
            mss_clamp: Some(clamp(1420)),
            controller_connections: Some(replies()),
        }));
        let mut seen = Vec::new();
        for m in &messages {
            let mut m = m.clone();
            m.finalize();
            let mut buf = vec![0; m.buffer_len()];
            m.emit(&mut buf);
            let back = NetlinkMessage::<NetfilterMessage>::parse(&NetlinkBuffer::new(&buf))
                .expect("our own message parses");
            seen.push(back.header.sequence_number);
        }
        let want: Vec<u32> = (1..=messages.len() as u32).collect();
        assert_eq!(seen, want);
    }

    #[test]
    fn the_masquerade_rule_matches_the_pod_cidr_of_its_family() {
        let messages = batch(Some(&only(egress(&["10.244.1.0/24"]))));
        let text = format!("{:?}", messages[messages.len() - 2]);
        // nfproto ipv4, the source address (offset 12, 4 bytes) under a /24 mask, masq.
        for part in [
            "Value([2])",
            "Offset(12)",
            "Len(4)",
            "Value([255, 255, 255, 0])",
            "Value([10, 244, 1, 0])",
            "\"masq\"",
        ] {
            assert!(text.contains(part), "{part} in {text}");
        }
        let v6 = batch(Some(&only(egress(&["fd00:10:244:1::5/64"]))));
        let text = format!("{:?}", v6[v6.len() - 2]);
        for part in ["Value([10])", "Offset(8)", "Len(16)"] {
            assert!(text.contains(part), "{part} in {text}");
        }
        assert!(
            text.contains("Value([253, 0, 0, 16, 2, 68, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0])"),
            "the network, host bits cleared: {text}"
        );
    }

    fn mark_value() -> String {
        format!("Value({:?})", 0x5157u32.to_ne_bytes())
    }

    fn replies() -> ControllerConnections {
        ControllerConnections {
            port: 9443,
            mark: 0x5157,
            tunnel: "wgmesh0".into(),
        }
    }

    #[test]
    fn controller_connections_leave_marked_as_their_requests_came() {
        let b = batch(Some(&NodeRules {
            controller_connections: Some(replies()),
            ..Default::default()
        }));
        assert_eq!(
            kinds(&b),
            [
                "BatchBegin",
                "NewTable",
                "DeleteTable",
                "NewTable",
                "NewChain",
                "NewRule",
                "NewChain",
                "NewRule",
                "NewChain",
                "NewRule",
                "NewChain",
                "NewRule",
                "BatchEnd"
            ]
        );
        let [input, own, marking, nat] = [5, 7, 9, 11].map(|i| format!("{:?}", b[i]));
        let dst_nat = format!("Value({:?})", 32u32.to_ne_bytes());
        for part in ["\"ct\"", &mark_value(), &dst_nat, "Oifname", "\"masq\""] {
            assert!(nat.contains(part), "{part} in {nat}");
        }
        // 9443 = 0x24e3, big-endian in the TCP header; the mark in host order.
        let port = "Value([36, 227])";
        let mark = format!("Value({:?})", 0x5157u32.to_ne_bytes());
        for part in [port, "Offset(2)", "NotEqual", "\"ct\"", &mark] {
            assert!(input.contains(part), "{part} in {input}");
        }
        for part in ["Key(Mark)", "\"ct\"", &mark] {
            assert!(own.contains(part), "{part} in {own}");
        }
        for part in ["\"ct\"", &mark, "SourceRegister"] {
            assert!(marking.contains(part), "{part} in {marking}");
        }
        let after_nat = format!("{:?}", b[8]);
        assert!(
            after_nat.contains("\"route\"")
                && after_nat.contains(&format!("Priority({})", -90i32 as u32)),
            "a route chain after kube-proxy's NAT: {after_nat}"
        );
    }

    #[test]
    fn interface_names_match_exactly() {
        assert_eq!(interface_name("wgmesh0").len(), IFNAMSIZ);
        assert_eq!(&interface_name("wgmesh0")[..8], b"wgmesh0\0");
        assert_eq!(interface_name("a-very-long-interface-name")[15], 0);
    }
}
