# Example TSSP admission policy (Rego v1, evaluated by regorus).
#
# The input document is described in docs/spec/tssp-v1.md ("Policy input document"):
#   input.manifest        the signed manifest (name, version, base_model, files, signers, ...)
#   input.evidence        the training evidence (run id, config hash, dataset commitment, ...)
#   input.dp_certificate  the engine's DP certificate, or null
#   input.signers         {"trusted": [key ids that verified and are trusted], "threshold": n}
#   input.now             the verifier's clock (RFC 3339 UTC)
#
# Every string in `deny` is a reason to refuse the package; an empty set admits it.
# Conditions are written so that a missing field denies (fail closed).
package tensafe.tssp

import rego.v1

max_epsilon := 8

max_delta := 1e-5

allowed_base_models := {
	"HuggingFaceTB/SmolLM2-135M-Instruct",
	"HuggingFaceTB/SmolLM2-360M-Instruct",
}

# Key ids (hex) that must be among the trusted signers; empty means "any trusted signer".
required_signers := set()

deny contains "package carries no DP certificate" if input.dp_certificate == null

# Certificates follow tensafe.dp_certificate/v2 (src/tensafe/privacy/dp_certificate.schema.json):
# private = true exactly when DP-SGD ran with CSPRNG noise and epsilon is a finite guarantee; a run
# without DP (dp_enabled = false) or with deterministic noise says private = false and epsilon = null.
# A v1 certificate has no "private" member, so this policy refuses it (v1 could state an epsilon
# that held only if the client had Poisson-sampled its batches).
deny contains "the training run did not use differential privacy" if {
	input.dp_certificate != null
	input.dp_certificate.dp_enabled != true
}

deny contains "the DP certificate does not state a differential privacy guarantee (private is not true)" if {
	input.dp_certificate != null
	not input.dp_certificate.private == true
}

deny contains msg if {
	input.dp_certificate != null
	not is_number(input.dp_certificate.epsilon)
	msg := "DP certificate has no numeric epsilon"
}

deny contains msg if {
	eps := input.dp_certificate.epsilon
	is_number(eps)
	eps > max_epsilon
	msg := sprintf("epsilon %v exceeds the maximum %v", [eps, max_epsilon])
}

deny contains msg if {
	input.dp_certificate != null
	not is_number(input.dp_certificate.delta)
	msg := "DP certificate has no numeric delta"
}

deny contains msg if {
	d := input.dp_certificate.delta
	is_number(d)
	d > max_delta
	msg := sprintf("delta %v exceeds the maximum %v", [d, max_delta])
}

deny contains msg if {
	not input.manifest.base_model.id in allowed_base_models
	msg := sprintf("base model %v is not allowed", [input.manifest.base_model.id])
}

deny contains msg if {
	some k in required_signers
	not k in {s | some s in input.signers.trusted}
	msg := sprintf("required signer %v did not sign", [k])
}
