package signerpb

// AgentVersionHeader is the request metadata key in which an agent sends
// its build version on Attest; the signer shows it in `node list`.
const AgentVersionHeader = "lanyard-agent-version"

// RevokedPrefix begins the PermissionDenied message of every call the
// signer refuses because the node is revoked: "node revoked: <reason>".
const RevokedPrefix = "node revoked: "
