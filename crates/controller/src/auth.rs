//! Agent authentication: a projected service-account token (audience `wgmesh`), checked with a
//! TokenReview, must belong to the agent's service account and be bound to a pod running on the
//! node the request names.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use blake2::{Blake2s256, Digest};
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, PostParams};
use tonic::{Status, metadata::MetadataMap};

use crate::metrics::Metrics;

/// Extra keys the API server adds to a pod-bound service-account token's user info.
const EXTRA_POD_NAME: &str = "authentication.kubernetes.io/pod-name";
const EXTRA_NODE_NAME: &str = "authentication.kubernetes.io/node-name";

/// How long a successful review is trusted before asking the API server again.
const POSITIVE_TTL: Duration = Duration::from_secs(30);
/// How long a failed review is remembered, so a misbehaving client cannot hammer the API.
const NEGATIVE_TTL: Duration = Duration::from_secs(5);
const CACHE_LIMIT: usize = 10_000;
/// Failed reviews allowed in a burst, and refilled per second, for each source address: past
/// that, tokens not already reviewed from that address are refused without asking the API
/// server. Per source, so that one caller spraying bogus tokens locks out only itself, not
/// the agents that start meanwhile.
const FAILED_REVIEW_BURST: f64 = 20.0;
const FAILED_REVIEWS_PER_SECOND: f64 = 2.0;
/// The same for all sources together: what bogus tokens can cost the API server at most.
const ALL_FAILED_REVIEW_BURST: f64 = 200.0;
const ALL_FAILED_REVIEWS_PER_SECOND: f64 = 20.0;
/// Sources whose budget is remembered; past that, the full ones are kept (the others would
/// start full anyway).
const SOURCES_LIMIT: usize = 4096;
/// How long a source an agent's call was authorized from is exempt from the budget of all
/// sources: a token's lifetime (agents in a quiet mesh call seldom, on a long-lived stream).
const VOUCHED_FOR: Duration = Duration::from_secs(3600);
/// Token reviews asked of the API server at once. The failure budgets are charged when a
/// review comes back, so without this a burst of bogus tokens sent at once would all pass
/// the budget check before the first failure is counted.
const REVIEWS_IN_FLIGHT: usize = 16;

/// A token bucket: `burst` events at once, refilled at `per_second` (failed token reviews
/// here; a node's key changes in Register).
#[derive(Debug)]
pub(crate) struct TokenBucket {
    tokens: f64,
    at: Instant,
    burst: f64,
    per_second: f64,
}

impl TokenBucket {
    fn failed_reviews(now: Instant) -> Self {
        Self::with(now, FAILED_REVIEW_BURST, FAILED_REVIEWS_PER_SECOND)
    }

    pub(crate) fn with(now: Instant, burst: f64, per_second: f64) -> Self {
        TokenBucket {
            tokens: burst,
            at: now,
            burst,
            per_second,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.per_second).min(self.burst);
        self.at = now;
    }

    /// Whether an event may happen now.
    pub(crate) fn allows(&mut self, now: Instant) -> bool {
        self.refill(now);
        self.tokens >= 1.0
    }

    /// Counts an event.
    pub(crate) fn charge(&mut self, now: Instant) {
        self.refill(now);
        self.tokens = (self.tokens - 1.0).max(0.0);
    }

    /// Refilled completely: remembering it changes nothing.
    pub(crate) fn is_full(&mut self, now: Instant) -> bool {
        self.refill(now);
        self.tokens >= self.burst
    }
}

/// Failure budgets by source address, and for all sources together.
#[derive(Debug)]
struct FailureBudgets {
    all: TokenBucket,
    by_source: HashMap<IpAddr, TokenBucket>,
    /// Sources an agent's call was authorized from lately (its node): the budget of all
    /// sources together does not apply to them, so that many callers spraying bogus tokens
    /// together cannot lock the agents out. Only an agent's token for its own node vouches:
    /// any pod can get a valid token of its own account.
    vouched: HashMap<IpAddr, Instant>,
}

impl FailureBudgets {
    fn new(now: Instant) -> Self {
        FailureBudgets {
            all: TokenBucket::with(now, ALL_FAILED_REVIEW_BURST, ALL_FAILED_REVIEWS_PER_SECOND),
            by_source: HashMap::new(),
            vouched: HashMap::new(),
        }
    }

    /// Whether a review for a token from `source` may be sent now.
    fn allows(&mut self, source: IpAddr, now: Instant) -> bool {
        let vouched = self
            .vouched
            .get(&source)
            .is_some_and(|at| now.saturating_duration_since(*at) < VOUCHED_FOR);
        (vouched || self.all.allows(now))
            && self
                .by_source
                .get_mut(&source)
                .is_none_or(|b| b.allows(now))
    }

    /// Counts a token that passed review from `source`.
    fn vouch(&mut self, source: IpAddr, now: Instant) {
        if self.vouched.len() >= SOURCES_LIMIT && !self.vouched.contains_key(&source) {
            self.vouched
                .retain(|_, at| now.saturating_duration_since(*at) < VOUCHED_FOR);
            if self.vouched.len() >= SOURCES_LIMIT {
                return;
            }
        }
        self.vouched.insert(source, now);
    }

    /// Counts a failed review of a token from `source`.
    fn charge(&mut self, source: IpAddr, now: Instant) {
        self.all.charge(now);
        if self.by_source.len() >= SOURCES_LIMIT && !self.by_source.contains_key(&source) {
            self.by_source.retain(|_, b| !b.is_full(now));
            if self.by_source.len() >= SOURCES_LIMIT {
                return;
            }
        }
        self.by_source
            .entry(source)
            .or_insert_with(|| TokenBucket::failed_reviews(now))
            .charge(now);
    }
}

/// Who a token belongs to, once reviewed.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Identity {
    username: String,
    /// The node of the pod the token is bound to.
    node: Option<String>,
}

/// What authorized a peer stream: its token, checked again while the stream lasts, and when
/// the token expires (its `exp` claim; the API server checked the signature).
pub struct StreamGrant {
    token: String,
    source: IpAddr,
    node: String,
    expires: Option<SystemTime>,
}

impl StreamGrant {
    /// When the stream's token expires, if it says.
    pub fn expires(&self) -> Option<SystemTime> {
        self.expires
    }

    fn expired(&self, now: SystemTime) -> bool {
        self.expires.is_some_and(|at| at <= now)
    }
}

/// The `exp` claim of a JWT (seconds since the epoch), read without checking the signature:
/// only for a token the API server has reviewed. `None` when the token says nothing usable.
fn jwt_expiry(token: &str) -> Option<SystemTime> {
    use base64::Engine;
    let payload = token.split('.').nth(1)?;
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&json).ok()?;
    let exp = claims.get("exp")?.as_u64()?;
    SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(exp))
}

/// A review result as cached: the identity, or the refusal's code and message.
type CachedReview = Result<Identity, (tonic::Code, String)>;

pub struct Authenticator {
    client: kube::Client,
    audience: String,
    /// `system:serviceaccount:<namespace>:<name>` of the agents.
    agent_username: String,
    cache: Mutex<HashMap<[u8; 32], (Instant, CachedReview)>>,
    failures: Mutex<FailureBudgets>,
    /// Turns to ask the API server ([`REVIEWS_IN_FLIGHT`]).
    review_turns: tokio::sync::Semaphore,
    metrics: Metrics,
}

impl Authenticator {
    pub fn new(
        client: kube::Client,
        audience: String,
        agent_namespace: &str,
        agent_service_account: &str,
        metrics: Metrics,
    ) -> Self {
        Authenticator {
            client,
            audience,
            agent_username: format!(
                "system:serviceaccount:{agent_namespace}:{agent_service_account}"
            ),
            cache: Mutex::new(HashMap::new()),
            failures: Mutex::new(FailureBudgets::new(Instant::now())),
            review_turns: tokio::sync::Semaphore::new(REVIEWS_IN_FLIGHT),
            metrics,
        }
    }

    /// Checks that the request carries a valid agent token bound to `node`.
    /// `source` is the caller's address (unknown: the unspecified address).
    pub async fn authorize_node(
        &self,
        metadata: &MetadataMap,
        source: Option<IpAddr>,
        node: &str,
    ) -> Result<(), Status> {
        let source = known_or_unspecified(source);
        let result = self.check(metadata, source, node).await;
        if let Err(status) = &result {
            tracing::warn!(node, code = ?status.code(), reason = status.message(), "refused an agent");
            self.metrics.auth_failure(status.code());
        }
        result
    }

    /// Checks that the call carries a token of the agents' account, without knowing yet
    /// which node it speaks for (its body is not read): see `early_auth`. The review is
    /// cached, so the handler's [`Authenticator::authorize_node`] costs no second one.
    pub async fn authenticate_agent(
        &self,
        headers: &http::HeaderMap,
        source: Option<IpAddr>,
    ) -> Result<(), Status> {
        let source = known_or_unspecified(source);
        let metadata = MetadataMap::from_headers(headers.clone());
        let result = self.agent_identity(&metadata, source).await.map(|_| ());
        if let Err(status) = &result {
            tracing::warn!(code = ?status.code(), reason = status.message(), "refused a call before reading it");
            self.metrics.auth_failure(status.code());
        }
        result
    }

    /// Authorizes a peer stream of `node` as [`Authenticator::authorize_node`] does, and
    /// returns what to check it by again while it lasts ([`Authenticator::still_authorized`]):
    /// a stream must not outlive its token, nor the pod the token is bound to.
    pub async fn authorize_stream(
        &self,
        metadata: &MetadataMap,
        source: Option<IpAddr>,
        node: &str,
    ) -> Result<StreamGrant, Status> {
        self.authorize_node(metadata, source, node).await?;
        let token = bearer_token(metadata)?;
        let expires = jwt_expiry(token);
        if expires.is_some_and(|at| at <= SystemTime::now()) {
            // Within the API server's leeway, but a stream would end at once.
            tracing::warn!(node, "refused a peer stream: its token has expired");
            self.metrics.auth_failure(tonic::Code::Unauthenticated);
            return Err(Status::unauthenticated(
                "the token has expired: connect again with a fresh one",
            ));
        }
        Ok(StreamGrant {
            token: token.to_owned(),
            source: known_or_unspecified(source),
            node: node.to_owned(),
            expires,
        })
    }

    /// Whether the token a stream was opened with still passes review for its node (its pod
    /// may have been deleted since). A review answered within [`POSITIVE_TTL`] is reused.
    pub async fn still_authorized(&self, grant: &StreamGrant) -> Result<(), Status> {
        if grant.expired(SystemTime::now()) {
            return Err(Status::unauthenticated(
                "the stream's token has expired: connect again with a fresh one",
            ));
        }
        let result = match self.reviewed_agent(&grant.token, grant.source).await {
            Ok(identity) => self.check_identity(identity, grant.source, &grant.node),
            Err(status) => Err(status),
        };
        if let Err(status) = &result
            && status.code() != tonic::Code::Unavailable
        {
            tracing::warn!(node = grant.node, code = ?status.code(), reason = status.message(), "ended a peer stream whose token no longer passes review");
            self.metrics.auth_failure(status.code());
        }
        result
    }

    /// The reviewed identity of the call's token, which must be the agents' account.
    async fn agent_identity(
        &self,
        metadata: &MetadataMap,
        source: IpAddr,
    ) -> Result<Identity, Status> {
        self.reviewed_agent(bearer_token(metadata)?, source).await
    }

    /// The reviewed identity of `token`, which must be the agents' account.
    async fn reviewed_agent(&self, token: &str, source: IpAddr) -> Result<Identity, Status> {
        let identity = self.review(token, source).await?;
        if identity.username != self.agent_username {
            return Err(Status::permission_denied(format!(
                "{} is not the agent service account {}",
                identity.username, self.agent_username
            )));
        }
        Ok(identity)
    }

    async fn check(
        &self,
        metadata: &MetadataMap,
        source: IpAddr,
        node: &str,
    ) -> Result<(), Status> {
        let identity = self.agent_identity(metadata, source).await?;
        self.check_identity(identity, source, node)
    }

    /// Whether a reviewed agent `identity` may speak for `node`.
    fn check_identity(&self, identity: Identity, source: IpAddr, node: &str) -> Result<(), Status> {
        match identity.node.as_deref() {
            Some(n) if n == node => {
                // An agent's own token, for its own node: its source is exempt from the
                // budget of all sources, renewed with every call it makes.
                self.failures
                    .lock()
                    .expect("failure budget lock")
                    .vouch(source, Instant::now());
                Ok(())
            }
            Some(n) => Err(Status::permission_denied(format!(
                "the token belongs to a pod on node {n}, not {node}"
            ))),
            None => Err(Status::permission_denied(
                "the token is not bound to a pod on a node (use a projected service-account token)",
            )),
        }
    }

    async fn review(&self, token: &str, source: IpAddr) -> Result<Identity, Status> {
        let hash: [u8; 32] = Blake2s256::digest(token.as_bytes()).into();
        if let Some(hit) = self.cached(&hash) {
            return hit.map_err(|(code, msg)| Status::new(code, msg));
        }
        let _turn = self
            .review_turns
            .acquire()
            .await
            .map_err(|_| Status::unavailable("shutting down"))?;
        // Another request with this token may have been answered while we waited.
        if let Some(hit) = self.cached(&hash) {
            return hit.map_err(|(code, msg)| Status::new(code, msg));
        }
        if !self
            .failures
            .lock()
            .expect("failure budget lock")
            .allows(source, Instant::now())
        {
            return Err(Status::resource_exhausted(
                "too many failed token reviews; retry later",
            ));
        }
        let result = self.review_uncached(token).await;
        if matches!(&result, Err(s) if s.code() != tonic::Code::Unavailable) {
            self.failures
                .lock()
                .expect("failure budget lock")
                .charge(source, Instant::now());
        }
        let ttl = if result.is_ok() {
            POSITIVE_TTL
        } else {
            NEGATIVE_TTL
        };
        let stored = match &result {
            Ok(id) => Ok(id.clone()),
            // API errors are not cached: they say nothing about the token.
            Err(s) if s.code() == tonic::Code::Unavailable => return result,
            Err(s) => Err((s.code(), s.message().to_owned())),
        };
        let mut cache = self.cache.lock().expect("auth cache lock");
        if cache.len() >= CACHE_LIMIT {
            let now = Instant::now();
            cache.retain(|_, (expiry, _)| *expiry > now);
            if cache.len() >= CACHE_LIMIT {
                cache.clear();
            }
        }
        cache.insert(hash, (Instant::now() + ttl, stored));
        result
    }

    fn cached(&self, hash: &[u8; 32]) -> Option<CachedReview> {
        let cache = self.cache.lock().expect("auth cache lock");
        let (expiry, result) = cache.get(hash)?;
        (*expiry > Instant::now()).then(|| result.clone())
    }

    async fn review_uncached(&self, token: &str) -> Result<Identity, Status> {
        let reviews: Api<TokenReview> = Api::all(self.client.clone());
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_owned()),
                audiences: Some(vec![self.audience.clone()]),
            },
            ..Default::default()
        };
        let reviewed = reviews
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| Status::unavailable(format!("TokenReview failed: {e}")))?;
        let status = reviewed.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            let why = status
                .error
                .unwrap_or_else(|| "token not authenticated".into());
            return Err(Status::unauthenticated(why));
        }
        let audiences = status.audiences.unwrap_or_default();
        if !audiences.contains(&self.audience) {
            return Err(Status::unauthenticated(format!(
                "the token is not for audience {}",
                self.audience
            )));
        }
        let user = status.user.unwrap_or_default();
        let username = user.username.unwrap_or_default();
        let extra = user.extra.unwrap_or_default();
        let first = |k: &str| extra.get(k).and_then(|v| v.first()).cloned();
        let node = match binding(first(EXTRA_NODE_NAME), first(EXTRA_POD_NAME)) {
            Binding::PodOnNode(node) => Some(node),
            // Older API servers bind the pod but not the node: look the pod up, but only for
            // the agents' account (anyone else is refused anyway, without costing a read).
            Binding::Pod(pod) if username == self.agent_username => {
                self.node_of_pod(&username, &pod).await?
            }
            Binding::Pod(_) | Binding::NoPod => None,
        };
        Ok(Identity { username, node })
    }
}

/// What a reviewed token's extras bind it to.
#[derive(Debug, PartialEq, Eq)]
enum Binding {
    /// A pod, on this node: an agent's projected token.
    PodOnNode(String),
    /// A pod, its node not named (older API servers).
    Pod(String),
    /// No pod: a token bound to the Node alone (`kubectl create token --bound-object-kind
    /// Node`) or to nothing is no agent's, whatever node it names.
    NoPod,
}

fn binding(node: Option<String>, pod: Option<String>) -> Binding {
    match (node, pod) {
        (Some(node), Some(_)) => Binding::PodOnNode(node),
        (None, Some(pod)) => Binding::Pod(pod),
        (_, None) => Binding::NoPod,
    }
}

impl Authenticator {
    async fn node_of_pod(&self, username: &str, pod: &str) -> Result<Option<String>, Status> {
        let namespace = username
            .strip_prefix("system:serviceaccount:")
            .and_then(|rest| rest.split(':').next())
            .ok_or_else(|| Status::permission_denied("not a service account"))?;
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
        match pods.get_opt(pod).await {
            Ok(Some(p)) => Ok(p.spec.and_then(|s| s.node_name)),
            Ok(None) => Err(Status::unauthenticated(format!(
                "the token's pod {namespace}/{pod} no longer exists"
            ))),
            Err(e) => Err(Status::unavailable(format!(
                "reading pod {namespace}/{pod}: {e}"
            ))),
        }
    }
}

/// A call's source address; the unspecified address when the transport does not say (one
/// budget for all such calls).
fn known_or_unspecified(source: Option<IpAddr>) -> IpAddr {
    source.unwrap_or(IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED))
}

fn bearer_token(metadata: &MetadataMap) -> Result<&str, Status> {
    let value = metadata
        .get("authorization")
        .ok_or_else(|| Status::unauthenticated("no authorization metadata (Bearer token)"))?;
    let value = value
        .to_str()
        .map_err(|_| Status::unauthenticated("authorization metadata is not text"))?;
    let token = value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
        .ok_or_else(|| Status::unauthenticated("authorization metadata is not a Bearer token"))?
        .trim();
    if token.is_empty() {
        return Err(Status::unauthenticated("empty Bearer token"));
    }
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_token_bound_to_a_pod_speaks_for_a_node() {
        let s = |v: &str| Some(v.to_owned());
        for (node, pod, want) in [
            (s("n1"), s("agent-x"), Binding::PodOnNode("n1".into())),
            (None, s("agent-x"), Binding::Pod("agent-x".into())),
            (s("n1"), None, Binding::NoPod), // bound to the Node alone
            (None, None, Binding::NoPod),
        ] {
            assert_eq!(binding(node.clone(), pod.clone()), want, "{node:?} {pod:?}");
        }
    }

    #[test]
    fn one_source_spraying_bad_tokens_locks_out_only_itself() {
        let start = Instant::now();
        let mut budgets = FailureBudgets::new(start);
        let sprayer: IpAddr = "10.244.3.7".parse().unwrap();
        let agent: IpAddr = "192.168.0.2".parse().unwrap();
        for _ in 0..1000 {
            if budgets.allows(sprayer, start) {
                budgets.charge(sprayer, start);
            }
        }
        assert!(!budgets.allows(sprayer, start), "the sprayer is limited");
        assert!(budgets.allows(agent, start), "an agent elsewhere is not");
        // Many sprayers together are held to the global budget.
        let mut budgets = FailureBudgets::new(start);
        let mut sent = 0;
        for i in 0..2000u32 {
            let source = IpAddr::from(std::net::Ipv4Addr::from(0x0af4_0000 + i));
            if budgets.allows(source, start) {
                budgets.charge(source, start);
                sent += 1;
            }
        }
        assert_eq!(sent, ALL_FAILED_REVIEW_BURST as usize);
        // ...which locks out no node an agent's token passed review from lately.
        let outsider: IpAddr = "192.168.0.3".parse().unwrap();
        assert!(
            !budgets.allows(outsider, start),
            "the global budget is spent"
        );
        budgets.vouch(agent, start - Duration::from_secs(60));
        assert!(
            budgets.allows(agent, start),
            "a vouched node is not locked out"
        );
        let later = start + VOUCHED_FOR;
        budgets.all = TokenBucket::with(later, 0.0, 0.0);
        assert!(
            !budgets.allows(agent, later),
            "until its voucher is too old"
        );
        // Memory stays bounded whatever the number of sources.
        let mut budgets = FailureBudgets::new(start);
        for i in 0..(SOURCES_LIMIT as u32 * 3) {
            let at = start + Duration::from_secs(u64::from(i));
            budgets.charge(IpAddr::from(std::net::Ipv4Addr::from(i)), at);
        }
        assert!(budgets.by_source.len() <= SOURCES_LIMIT);
        for i in 0..(SOURCES_LIMIT as u32 * 3) {
            budgets.vouch(IpAddr::from(std::net::Ipv4Addr::from(i)), start);
        }
        assert!(budgets.vouched.len() <= SOURCES_LIMIT);
    }

    #[test]
    fn failed_reviews_are_rate_limited() {
        let start = Instant::now();
        let mut budget = TokenBucket::failed_reviews(start);
        let burst = FAILED_REVIEW_BURST as usize;
        for i in 0..burst {
            assert!(budget.allows(start), "review {i} of the burst");
            budget.charge(start);
        }
        assert!(!budget.allows(start), "the burst is spent");
        let one_token = Duration::from_secs_f64(1.0 / FAILED_REVIEWS_PER_SECOND);
        assert!(
            !budget.allows(start + one_token / 2),
            "half a token is not enough"
        );
        assert!(
            budget.allows(start + one_token),
            "refilled at the steady rate"
        );
        budget.charge(start + one_token);
        assert!(!budget.allows(start + one_token));
        let later = start + Duration::from_secs(3600);
        assert!(budget.allows(later));
        for _ in 0..burst {
            budget.charge(later);
        }
        assert!(
            !budget.allows(later),
            "the bucket never holds more than the burst"
        );
    }

    #[test]
    fn jwt_expiry_table() {
        use base64::Engine;
        let enc = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        let jwt = |claims: &str| format!("{}.{}.sig", enc(r#"{"alg":"ES256"}"#), enc(claims));
        let at = |secs: u64| Some(SystemTime::UNIX_EPOCH + Duration::from_secs(secs));
        let cases: Vec<(String, Option<SystemTime>)> = vec![
            (jwt(r#"{"exp":1700000000,"sub":"x"}"#), at(1_700_000_000)),
            (jwt(r#"{"sub":"x"}"#), None),
            (jwt(r#"{"exp":"soon"}"#), None),
            (jwt(r#"{"exp":-5}"#), None),
            (jwt(r#"{"exp":1.5e300}"#), None),
            (jwt(&format!(r#"{{"exp":{}}}"#, u64::MAX)), None),
            (jwt("not json"), None),
            (format!("{}.{}=.sig", enc("{}"), enc(r#"{"exp":7}"#)), at(7)),
            ("no-dots".into(), None),
            ("a.!!!.c".into(), None),
            (String::new(), None),
        ];
        for (token, want) in cases {
            assert_eq!(jwt_expiry(&token), want, "{token}");
        }
    }

    #[test]
    fn bearer_token_table() {
        let cases: &[(Option<&str>, Result<&str, tonic::Code>)] = &[
            (None, Err(tonic::Code::Unauthenticated)),
            (Some("Bearer abc.def"), Ok("abc.def")),
            (Some("bearer abc"), Ok("abc")),
            (Some("Basic dXNlcg=="), Err(tonic::Code::Unauthenticated)),
            (Some("Bearer "), Err(tonic::Code::Unauthenticated)),
        ];
        for (header, want) in cases {
            let mut md = MetadataMap::new();
            if let Some(h) = header {
                md.insert("authorization", h.parse().unwrap());
            }
            let got = bearer_token(&md).map_err(|s| s.code());
            assert_eq!(&got, want, "{header:?}");
        }
    }
}
