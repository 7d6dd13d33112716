package workloadapi

import (
	"context"
	"strings"
	"time"

	"github.com/go-jose/go-jose/v4/jwt"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// actionClaims are the claims of an action token (README "Credentials for
// AI agents and automation"): sub is "<parent ID>/action/<name>" and the
// RFC 8693 act claim names the parent, the entry's own SPIFFE ID.
type actionClaims struct {
	jwt.Claims
	Act *struct {
		Sub string `json:"sub"`
	} `json:"act"`
}

// action is the action name, read from sub below the parent.
func (a *actionClaims) action() string {
	name, _ := strings.CutPrefix(a.Subject, a.Act.Sub+"/action/")
	return name
}

func (a *actionClaims) exp() string {
	if a.Expiry == nil {
		return ""
	}
	return a.Expiry.Time().UTC().Format(time.RFC3339)
}

// actionClaimsOf reads the claims of a token the agent is about to serve,
// for the audit line, and reports whether it is an action token. The
// token came from the signer and is not verified here: only read.
func actionClaimsOf(token string) (*actionClaims, bool) {
	tok, err := jwt.ParseSigned(token, jwtAlgorithms)
	if err != nil {
		return nil, false
	}
	var c actionClaims
	if err := tok.UnsafeClaimsWithoutVerification(&c); err != nil || c.Act == nil {
		return nil, false
	}
	return &c, true
}

// verifiedTokenFrom reads what the TokenGuard needs from the claims of a
// token whose signature verified.
func verifiedTokenFrom(sub spiffeid.ID, claims map[string]any) verifiedToken {
	t := verifiedToken{sub: sub}
	t.jti, _ = claims["jti"].(string)
	t.iat = numericDate(claims["iat"])
	t.exp = numericDate(claims["exp"])
	if act, ok := claims["act"]; ok {
		t.isAction = true
		if m, ok := act.(map[string]any); ok {
			t.actor, _ = m["sub"].(string)
		}
	}
	return t
}

// numericDate reads a JWT NumericDate claim as decoded from JSON; zero
// when absent or not a number.
func numericDate(v any) time.Time {
	f, ok := v.(float64)
	if !ok {
		return time.Time{}
	}
	return time.Unix(int64(f), 0)
}

// admitToken applies the token guard to a token that verified: a revoked
// token is refused, and an action token is accepted once. Every decision
// on an action token is an audit line naming the token (by jti, never the
// token), its parent and the caller; a refused revoked token is one too.
func (h *handler) admitToken(ctx context.Context, sub spiffeid.ID, claims map[string]any, audience string) error {
	t := verifiedTokenFrom(sub, claims)
	err := h.tokens.admit(t, time.Now())
	if err == nil && !t.isAction {
		return nil
	}
	proc, _ := callerFromContext(ctx)
	log := h.log.With("pid", proc.PID, "uid", proc.UID, "audience", audience, "jti", t.jti, "sub", sub.String())
	if t.isAction {
		// The caller's executable, as for a fetch: the audit names who
		// spent the token. Attesting costs a little, only on action tokens.
		exe := ""
		if _, selectors, aerr := h.attest(ctx); aerr == nil {
			exe = exePath(selectors)
		}
		log = log.With("act", t.actor, "exe", exe)
	}
	if err == nil {
		log.Info("validated action JWT-SVID")
		return nil
	}
	log.Info("refused JWT-SVID", "reason", err.Error())
	return status.Error(codes.InvalidArgument, err.Error())
}
