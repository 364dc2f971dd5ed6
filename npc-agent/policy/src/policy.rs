//! A NetworkPolicy, validated and normalised.
//!
//! `Policy::from_k8s` is the one place where a networking.k8s.io/v1 NetworkPolicy is checked: every
//! error names the field (`spec.ingress[0].from[1].ipBlock.except[0]`) so that a user can fix it,
//! and a policy that fails is rejected whole while every other policy still applies.
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
};

use ipnet::IpNet;
use k8s_openapi::{
    api::networking::v1::{NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort, NetworkPolicySpec},
    apimachinery::pkg::{apis::meta::v1::LabelSelector, util::intstr::IntOrString},
};

use crate::model::{Labels, ObjectRef, Protocol};

/// A policy that could not be accepted, with the field that is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct PolicyError {
    pub field: String,
    pub message: String,
}

impl From<crate::model::ObjectError> for PolicyError {
    fn from(e: crate::model::ObjectError) -> Self {
        let crate::model::ObjectError::Field { field, message } = e;
        Self { field, message }
    }
}

fn err(field: impl Into<String>, message: impl Into<String>) -> PolicyError {
    PolicyError {
        field: field.into(),
        message: message.into(),
    }
}

/// A label selector (matchLabels AND every matchExpression). The empty selector matches everything.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Selector {
    pub requirements: Vec<Requirement>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Requirement {
    pub key: String,
    pub op: Operator,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Operator {
    In(BTreeSet<String>),
    NotIn(BTreeSet<String>),
    Exists,
    DoesNotExist,
}

impl Selector {
    pub fn everything() -> Self {
        Self::default()
    }

    pub fn from_labels(labels: &[(&str, &str)]) -> Self {
        Self {
            requirements: labels
                .iter()
                .map(|(k, v)| Requirement {
                    key: k.to_string(),
                    op: Operator::In([v.to_string()].into()),
                })
                .collect(),
        }
    }

    pub fn matches(&self, labels: &Labels) -> bool {
        self.requirements.iter().all(|r| match &r.op {
            Operator::In(values) => labels.get(&r.key).is_some_and(|v| values.contains(v)),
            // As in Kubernetes: NotIn also matches objects without the key.
            Operator::NotIn(values) => labels.get(&r.key).is_none_or(|v| !values.contains(v)),
            Operator::Exists => labels.contains_key(&r.key),
            Operator::DoesNotExist => !labels.contains_key(&r.key),
        })
    }

    fn from_k8s(sel: &LabelSelector, field: &str) -> Result<Self, PolicyError> {
        let mut requirements = Vec::new();
        for (key, value) in sel.match_labels.iter().flatten() {
            validate_label_key(key).map_err(|m| err(format!("{field}.matchLabels"), format!("key {key:?}: {m}")))?;
            validate_label_value(value)
                .map_err(|m| err(format!("{field}.matchLabels.{key}"), format!("value {value:?}: {m}")))?;
            requirements.push(Requirement {
                key: key.clone(),
                op: Operator::In([value.clone()].into()),
            });
        }
        for (i, expr) in sel.match_expressions.iter().flatten().enumerate() {
            let f = format!("{field}.matchExpressions[{i}]");
            validate_label_key(&expr.key).map_err(|m| err(format!("{f}.key"), format!("{:?}: {m}", expr.key)))?;
            let values: BTreeSet<String> = expr.values.iter().flatten().cloned().collect();
            for v in &values {
                validate_label_value(v).map_err(|m| err(format!("{f}.values"), format!("{v:?}: {m}")))?;
            }
            let op = match expr.operator.as_str() {
                "In" | "NotIn" if values.is_empty() => {
                    return Err(err(
                        format!("{f}.values"),
                        format!("must be non-empty for operator {}", expr.operator),
                    ));
                }
                "In" => Operator::In(values),
                "NotIn" => Operator::NotIn(values),
                "Exists" | "DoesNotExist" if !values.is_empty() => {
                    return Err(err(
                        format!("{f}.values"),
                        format!("must be empty for operator {}", expr.operator),
                    ));
                }
                "Exists" => Operator::Exists,
                "DoesNotExist" => Operator::DoesNotExist,
                other => {
                    return Err(err(
                        format!("{f}.operator"),
                        format!("unknown operator {other:?} (In, NotIn, Exists, DoesNotExist)"),
                    ));
                }
            };
            requirements.push(Requirement {
                key: expr.key.clone(),
                op,
            });
        }
        Ok(Self { requirements })
    }
}

/// A label value: empty, or at most 63 characters of `[A-Za-z0-9._-]` starting and ending alphanumeric.
pub fn validate_label_value(value: &str) -> Result<(), String> {
    if value.is_empty() {
        return Ok(());
    }
    validate_name_part(value)
}

fn validate_name_part(s: &str) -> Result<(), String> {
    if s.len() > 63 {
        return Err("must be at most 63 characters".into());
    }
    let bytes = s.as_bytes();
    let alnum = |b: &u8| b.is_ascii_alphanumeric();
    if !bytes.first().is_some_and(alnum) || !bytes.last().is_some_and(alnum) {
        return Err("must start and end with a letter or digit".into());
    }
    if let Some(c) = s
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return Err(format!("must not contain {c:?} (only letters, digits, '-', '_', '.')"));
    }
    Ok(())
}

/// A label key: `[prefix/]name`, the prefix a DNS subdomain.
pub fn validate_label_key(key: &str) -> Result<(), String> {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    if name.is_empty() {
        return Err("name part must not be empty".into());
    }
    validate_name_part(name)?;
    if let Some(prefix) = prefix {
        let ok = !prefix.is_empty()
            && prefix.len() <= 253
            && prefix.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                    && !label.starts_with('-')
                    && !label.ends_with('-')
            });
        if !ok {
            return Err(format!("prefix {prefix:?} is not a DNS subdomain"));
        }
    }
    Ok(())
}

/// A port name as the API server requires it (IANA_SVC_NAME): 1-15 characters of lowercase
/// letters, digits and '-', at least one letter, no '-' at either end and no "--". So "80" as a
/// string is not a port: the API server rejects it, and so does npc.
pub fn validate_port_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 15 {
        return Err("is not a port name: it must be 1-15 characters".into());
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
    {
        return Err(format!(
            "is not a port name: it must not contain {c:?} (only lowercase letters, digits and '-')"
        ));
    }
    if !name.bytes().any(|b| b.is_ascii_lowercase()) {
        return Err(
            "is not a port name: it must contain at least one letter (a number is written without quotes)".into(),
        );
    }
    if name.starts_with('-') || name.ends_with('-') || name.contains("--") {
        return Err("is not a port name: '-' must not start or end it or follow another '-'".into());
    }
    Ok(())
}

/// Which namespaces a pod peer selects from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NamespaceScope {
    /// Only `podSelector`: the policy's own namespace.
    Own,
    Selector(Selector),
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IpBlock {
    /// Normalised (host bits cleared), as the API server accepts `10.0.0.1/8` to mean `10.0.0.0/8`.
    pub cidr: IpNet,
    pub except: Vec<IpNet>,
}

impl IpBlock {
    pub fn contains(&self, addr: std::net::IpAddr) -> bool {
        self.cidr.contains(&addr) && !self.except.iter().any(|e| e.contains(&addr))
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Peer {
    Pods { namespaces: NamespaceScope, pods: Selector },
    IpBlock(IpBlock),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PortSpec {
    /// `port` None = every port of the protocol; `end` = endPort (inclusive).
    Number {
        protocol: Protocol,
        port: Option<u16>,
        end: Option<u16>,
    },
    /// Resolved against the destination pod's declared container ports.
    Named { protocol: Protocol, name: String },
}

/// One ingress or egress rule. `peers` None = every peer (a missing or empty `from`/`to`);
/// `ports` None = every port and protocol.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub peers: Option<Vec<Peer>>,
    pub ports: Option<Vec<PortSpec>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Direction {
    Ingress,
    Egress,
}

impl Direction {
    pub fn as_u8(self) -> u8 {
        match self {
            Self::Ingress => npc_common::DIR_INGRESS,
            Self::Egress => npc_common::DIR_EGRESS,
        }
    }

    pub fn from_u8(d: u8) -> Option<Self> {
        match d {
            npc_common::DIR_INGRESS => Some(Self::Ingress),
            npc_common::DIR_EGRESS => Some(Self::Egress),
            _ => None,
        }
    }
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ingress => "ingress",
            Self::Egress => "egress",
        }
    }
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The name of a datapath direction byte as the agent prints it in logs, metrics and `inspect`:
/// "ingress" for [`npc_common::DIR_INGRESS`], "egress" for anything else.
pub fn direction_name(d: u8) -> &'static str {
    if d == npc_common::DIR_INGRESS {
        Direction::Ingress.as_str()
    } else {
        Direction::Egress.as_str()
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    pub id: ObjectRef,
    pub pod_selector: Selector,
    /// Some = this policy isolates selected pods for ingress and allows these rules.
    pub ingress: Option<Vec<Rule>>,
    pub egress: Option<Vec<Rule>>,
}

impl Policy {
    pub fn rules(&self, direction: Direction) -> Option<&[Rule]> {
        match direction {
            Direction::Ingress => self.ingress.as_deref(),
            Direction::Egress => self.egress.as_deref(),
        }
    }

    /// Validates a NetworkPolicy. `default_namespace` applies when the object has none.
    pub fn from_k8s(np: &NetworkPolicy, default_namespace: &str) -> Result<Self, PolicyError> {
        let (name, namespace) = crate::model::name_and_namespace(&np.metadata, default_namespace)
            .ok_or_else(|| err("metadata.name", "missing"))?;
        let spec = np.spec.as_ref().ok_or_else(|| err("spec", "missing"))?;
        let pod_selector = Selector::from_k8s(&spec.pod_selector.clone().unwrap_or_default(), "spec.podSelector")?;
        let (ingress, egress) = (
            rules_from_k8s(ingress_rules(spec), "spec.ingress", "from")?,
            rules_from_k8s(egress_rules(spec), "spec.egress", "to")?,
        );
        // policyTypes omitted or empty: Ingress, plus Egress when there is at least one egress
        // rule (as the API server's SetDefaults_NetworkPolicy defaults it: it tests `len == 0`).
        let (isolate_ingress, isolate_egress) = match &spec.policy_types {
            Some(types) if !types.is_empty() => {
                let mut flags = (false, false);
                for (i, t) in types.iter().enumerate() {
                    match t.as_str() {
                        "Ingress" => flags.0 = true,
                        "Egress" => flags.1 = true,
                        other => {
                            return Err(err(
                                format!("spec.policyTypes[{i}]"),
                                format!("unknown type {other:?} (Ingress or Egress)"),
                            ));
                        }
                    }
                }
                flags
            }
            _ => (true, !egress.is_empty()),
        };
        Ok(Self {
            id: ObjectRef::new(namespace, name),
            pod_selector,
            ingress: isolate_ingress.then_some(ingress),
            egress: isolate_egress.then_some(egress),
        })
    }
}

/// One k8s rule's peers (`from` / `to`) and ports.
pub(crate) type RuleParts<'a> = (Option<&'a [NetworkPolicyPeer]>, Option<&'a [NetworkPolicyPort]>);

pub(crate) fn ingress_rules(spec: &NetworkPolicySpec) -> impl Iterator<Item = RuleParts<'_>> + Clone {
    let rules = spec.ingress.iter().flatten();
    rules.map(|r| (r.from.as_deref(), r.ports.as_deref()))
}

pub(crate) fn egress_rules(spec: &NetworkPolicySpec) -> impl Iterator<Item = RuleParts<'_>> + Clone {
    let rules = spec.egress.iter().flatten();
    rules.map(|r| (r.to.as_deref(), r.ports.as_deref()))
}

/// Converts each item of an optional list, naming it `field[i]` in errors; a missing or empty list
/// is `None` (the API's "all peers" / "all ports").
fn each<T, U>(
    list: Option<&[T]>,
    field: &str,
    convert: impl Fn(&T, &str) -> Result<U, PolicyError>,
) -> Result<Option<Vec<U>>, PolicyError> {
    match list {
        None | Some([]) => Ok(None),
        Some(list) => list
            .iter()
            .enumerate()
            .map(|(j, item)| convert(item, &format!("{field}[{j}]")))
            .collect::<Result<Vec<_>, _>>()
            .map(Some),
    }
}

fn rules_from_k8s<'a>(
    rules: impl Iterator<Item = RuleParts<'a>>,
    field: &str,
    peers_field: &str,
) -> Result<Vec<Rule>, PolicyError> {
    rules
        .enumerate()
        .map(|(i, (peers, ports))| {
            let f = format!("{field}[{i}]");
            Ok(Rule {
                peers: each(peers, &format!("{f}.{peers_field}"), peer_from_k8s)?,
                ports: each(ports, &format!("{f}.ports"), port_from_k8s)?,
            })
        })
        .collect()
}

fn peer_from_k8s(peer: &NetworkPolicyPeer, field: &str) -> Result<Peer, PolicyError> {
    match (&peer.ip_block, &peer.namespace_selector, &peer.pod_selector) {
        (Some(block), None, None) => {
            let f = format!("{field}.ipBlock");
            let cidr = parse_cidr(&block.cidr).map_err(|m| err(format!("{f}.cidr"), m))?;
            let mut except = Vec::new();
            for (k, e) in block.except.iter().flatten().enumerate() {
                let ef = format!("{f}.except[{k}]");
                let net = parse_cidr(e).map_err(|m| err(&ef, m))?;
                if !cidr.contains(&net) {
                    return Err(err(ef, format!("{net} is not inside the cidr {cidr}")));
                }
                if net.prefix_len() <= cidr.prefix_len() {
                    return Err(err(
                        ef,
                        format!("{net} is the whole cidr {cidr}: an except must be strictly inside it"),
                    ));
                }
                except.push(net);
            }
            Ok(Peer::IpBlock(IpBlock { cidr, except }))
        }
        (Some(_), _, _) => Err(err(
            field,
            "ipBlock cannot be combined with namespaceSelector or podSelector",
        )),
        (None, None, None) => Err(err(field, "a peer needs podSelector, namespaceSelector or ipBlock")),
        (None, ns, pods) => {
            let namespaces = match ns {
                Some(sel) => NamespaceScope::Selector(Selector::from_k8s(sel, &format!("{field}.namespaceSelector"))?),
                None => NamespaceScope::Own,
            };
            let pods = match pods {
                Some(sel) => Selector::from_k8s(sel, &format!("{field}.podSelector"))?,
                None => Selector::everything(),
            };
            Ok(Peer::Pods { namespaces, pods })
        }
    }
}

fn parse_cidr(s: &str) -> Result<IpNet, String> {
    s.parse::<IpNet>()
        .map(|n| n.trunc())
        .map_err(|_| format!("{s:?} is not a CIDR (e.g. 10.0.0.0/8 or fd00::/64)"))
}

fn port_from_k8s(port: &NetworkPolicyPort, field: &str) -> Result<PortSpec, PolicyError> {
    let protocol = crate::model::protocol_of(port.protocol.as_deref(), &format!("{field}.protocol"))?;
    let check = |n: i32, f: &str| -> Result<u16, PolicyError> {
        u16::try_from(n)
            .ok()
            .filter(|n| *n != 0)
            .ok_or_else(|| err(format!("{field}.{f}"), format!("{n} is not a port (1-65535)")))
    };
    match &port.port {
        None => {
            if port.end_port.is_some() {
                return Err(err(format!("{field}.endPort"), "endPort needs a numeric port"));
            }
            Ok(PortSpec::Number {
                protocol,
                port: None,
                end: None,
            })
        }
        Some(IntOrString::Int(n)) => {
            let start = check(*n, "port")?;
            let end = match port.end_port {
                None => None,
                Some(e) => {
                    let end = check(e, "endPort")?;
                    if end < start {
                        return Err(err(format!("{field}.endPort"), format!("{end} is below port {start}")));
                    }
                    Some(end)
                }
            };
            Ok(PortSpec::Number {
                protocol,
                port: Some(start),
                end,
            })
        }
        Some(IntOrString::String(name)) => {
            if port.end_port.is_some() {
                return Err(err(
                    format!("{field}.endPort"),
                    "endPort cannot be used with a named port",
                ));
            }
            validate_port_name(name).map_err(|m| err(format!("{field}.port"), format!("{name:?} {m}")))?;
            Ok(PortSpec::Named {
                protocol,
                name: name.clone(),
            })
        }
    }
}

/// Policies by id, for lookups by the compiler and explain.
pub type Policies = BTreeMap<ObjectRef, Policy>;

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::files;

    /// The error for a policy whose spec is `spec` (YAML, indented under `spec:`).
    fn error_of(spec: &str) -> String {
        let text = format!(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: p, namespace: n}}\nspec:\n{spec}"
        );
        let loaded = files::parse_str(Path::new("p.yaml"), &text);
        assert!(loaded.policies.is_empty(), "should be rejected: {spec}");
        loaded.errors[0].to_string()
    }

    #[test]
    fn bad_input_names_the_field() {
        let cases = [
            (
                "  podSelector: {}\n  ingress: [{from: [{ipBlock: {cidr: 300.0.0.0/8}}]}]\n",
                "spec.ingress[0].from[0].ipBlock.cidr",
            ),
            (
                "  podSelector: {}\n  ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/8, except: [11.0.0.0/16]}}]}]\n",
                "spec.ingress[0].from[0].ipBlock.except[0]",
            ),
            (
                "  podSelector: {}\n  ingress: [{ports: [{port: 0}]}]\n",
                "spec.ingress[0].ports[0].port",
            ),
            (
                "  podSelector: {}\n  egress: [{ports: [{port: 70000}]}]\n",
                "spec.egress[0].ports[0].port",
            ),
            (
                "  podSelector: {}\n  ingress: [{ports: [{port: 90, endPort: 80}]}]\n",
                "spec.ingress[0].ports[0].endPort",
            ),
            (
                "  podSelector: {}\n  ingress: [{ports: [{port: http, endPort: 80}]}]\n",
                "spec.ingress[0].ports[0].endPort",
            ),
            (
                "  podSelector: {matchExpressions: [{key: app, operator: Near, values: [x]}]}\n",
                "spec.podSelector.matchExpressions[0].operator",
            ),
            (
                "  podSelector: {matchLabels: {app: 'bad value!'}}\n",
                "spec.podSelector.matchLabels.app",
            ),
            (
                "  podSelector: {}\n  ingress: [{ports: [{port: 80, protocol: ICMP}]}]\n",
                "spec.ingress[0].ports[0].protocol",
            ),
            ("  podSelector: {}\n  policyTypes: [Sideways]\n", "spec.policyTypes[0]"),
            (
                "  podSelector: {}\n  ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/8, except: [10.0.0.0/16, 10.0.0.0/8]}}]}]\n",
                "spec.ingress[0].from[0].ipBlock.except[1]: 10.0.0.0/8 is the whole cidr",
            ),
            (
                "  podSelector: {}\n  egress: [{to: [{ipBlock: {cidr: 'fd00::/64', except: ['fd00::1/64']}}]}]\n",
                "spec.egress[0].to[0].ipBlock.except[0]: fd00::/64 is the whole cidr",
            ),
            (
                "  podSelector: {}\n  ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/8, except: ['::ffff:10.0.0.0/112']}}]}]\n",
                "spec.ingress[0].from[0].ipBlock.except[0]: ::ffff:10.0.0.0/112 is not inside",
            ),
            (
                "  podSelector: {}\n  ingress: [{ports: [{port: '80'}]}]\n",
                "spec.ingress[0].ports[0].port: \"80\" is not a port name: it must contain at least one letter",
            ),
            (
                "  podSelector: {}\n  egress: [{ports: [{port: Http}]}]\n",
                "spec.egress[0].ports[0].port: \"Http\" is not a port name: it must not contain 'H'",
            ),
            (
                "  podSelector: {}\n  ingress: [{ports: [{port: web_ui}]}]\n",
                "spec.ingress[0].ports[0].port: \"web_ui\" is not a port name",
            ),
            (
                "  podSelector: {}\n  ingress: [{ports: [{port: -http}]}]\n",
                "spec.ingress[0].ports[0].port: \"-http\" is not a port name: '-'",
            ),
            (
                "  podSelector: {}\n  ingress: [{ports: [{port: http-}]}]\n",
                "spec.ingress[0].ports[0].port: \"http-\" is not a port name: '-'",
            ),
            (
                "  podSelector: {}\n  ingress: [{ports: [{port: h--p}]}]\n",
                "spec.ingress[0].ports[0].port: \"h--p\" is not a port name: '-'",
            ),
            (
                "  podSelector: {}\n  ingress: [{ports: [{port: abcdefghijklmnop}]}]\n",
                "spec.ingress[0].ports[0].port: \"abcdefghijklmnop\" is not a port name: it must be 1-15",
            ),
            (
                "  podSelector: {}\n  ingress: [{ports: [{port: ''}]}]\n",
                "spec.ingress[0].ports[0].port: \"\" is not a port name: it must be 1-15",
            ),
        ];
        for (spec, field) in cases {
            let e = error_of(spec);
            assert!(
                e.contains(field) && e.contains("n/p") && e.contains("p.yaml"),
                "{e:?} should name {field}"
            );
        }
    }

    #[test]
    fn good_port_names_and_excepts_pass() {
        for name in ["http", "h2c", "http-alt", "a", "x1-2-3", "abcdefghijklmno", "8080-tcp"] {
            assert_eq!(super::validate_port_name(name), Ok(()), "{name}");
        }
        let text = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p}\nspec:\n  podSelector: {}\n  ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/8, except: [10.0.0.0/9, 10.255.255.255/32]}}], ports: [{port: http-alt}, {port: 80}]}]\n";
        let loaded = files::parse_str(Path::new("p.yaml"), text);
        assert!(loaded.errors.is_empty(), "{:?}", loaded.errors);
    }

    /// `policyTypes: []` is defaulted like an omitted list (SetDefaults_NetworkPolicy tests
    /// `len == 0`): Ingress, plus Egress when there are egress rules.
    #[test]
    fn empty_policy_types_default_like_omitted_ones() {
        let policy = |types: &str, egress: &str| {
            let text = format!(
                "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: p}}\nspec:\n  podSelector: {{}}\n{types}  ingress: [{{}}]\n{egress}"
            );
            let loaded = files::parse_str(Path::new("p.yaml"), &text);
            assert!(loaded.errors.is_empty(), "{:?}", loaded.errors);
            let p = &loaded.policies[0];
            (p.ingress.is_some(), p.egress.is_some())
        };
        let egress_rule = "  egress: [{to: [{ipBlock: {cidr: 192.0.2.0/24}}]}]\n";
        for types in ["", "  policyTypes: []\n"] {
            assert_eq!(policy(types, ""), (true, false), "{types:?}");
            assert_eq!(policy(types, "  egress: []\n"), (true, false), "{types:?}");
            assert_eq!(policy(types, egress_rule), (true, true), "{types:?}");
        }
        assert_eq!(policy("  policyTypes: [Egress]\n", ""), (false, true));
        assert_eq!(policy("  policyTypes: [Ingress]\n", egress_rule), (true, false));
    }

    #[test]
    fn cidr_with_host_bits_means_its_network() {
        let text = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p}\nspec:\n  podSelector: {}\n  ingress: [{from: [{ipBlock: {cidr: 10.1.2.3/8}}]}]\n";
        let loaded = files::parse_str(Path::new("p.yaml"), text);
        let rules = loaded.policies[0].ingress.as_ref().unwrap();
        let Some(peers) = &rules[0].peers else { panic!("peers") };
        assert_eq!(
            peers[0],
            super::Peer::IpBlock(super::IpBlock {
                cidr: "10.0.0.0/8".parse().unwrap(),
                except: vec![]
            })
        );
    }

    #[test]
    fn legacy_extensions_v1beta1_is_accepted() {
        let text = "apiVersion: extensions/v1beta1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: n}\nspec:\n  podSelector: {matchLabels: {app: x}}\n  ingress: [{}]\n";
        let loaded = files::parse_str(Path::new("p.yaml"), text);
        assert!(loaded.errors.is_empty(), "{:?}", loaded.errors);
        assert_eq!(loaded.policies[0].ingress.as_ref().unwrap().len(), 1);
    }
}
