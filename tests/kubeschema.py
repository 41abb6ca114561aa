"""Validation of kp-run --emit's objects: Kubernetes' own kinds against the OpenAPI schema of
kube.K8S_VERSION (kubernetes-validate, strict: an unknown field is an error), and agent-sandbox's
v1beta1 custom resources against a JSON Schema written here from the facts of its CRDs
(kubernetes-sigs/agent-sandbox, k8s/crds/*.yaml at v0.5.6: group agents.x-k8s.io for Sandbox,
extensions.agents.x-k8s.io for the rest), their embedded pod templates and network rules checked
as a Pod and a NetworkPolicy by the Kubernetes schema."""

from __future__ import annotations

from typing import Any

from kodepipe.container import kube

Obj = dict[str, Any]

_STRINGS = {"type": "object", "additionalProperties": {"type": "string"}}
_POD_TEMPLATE = {"type": "object", "required": ["spec"], "additionalProperties": False,
                 "properties": {"metadata": {"type": "object", "additionalProperties": False,
                                             "properties": {"labels": _STRINGS, "annotations": _STRINGS}},
                                "spec": {"type": "object"}}}
_CLAIM_TEMPLATES = {"type": "array", "items": {
    "type": "object", "required": ["spec"], "additionalProperties": False,
    "properties": {"metadata": {"type": "object", "additionalProperties": False,
                                "properties": {"name": {"type": "string"}, "labels": _STRINGS,
                                               "annotations": _STRINGS}},
                   "spec": {"type": "object"}}}}
_POLICY = {"enum": ["Allowed", "Overrides", "Disallowed"]}
_REF = {"type": "object", "required": ["name"], "additionalProperties": False,
        "properties": {"name": {"type": "string"}}}

SPECS: dict[tuple[str, str], Obj] = {
    (kube.SANDBOX_GROUP, "Sandbox"): {
        "type": "object", "required": ["podTemplate"], "additionalProperties": False,
        "properties": {"podTemplate": _POD_TEMPLATE, "volumeClaimTemplates": _CLAIM_TEMPLATES,
                       "service": {"type": "boolean"}, "shutdownTime": {"type": "string", "format": "date-time"},
                       "shutdownPolicy": {"enum": ["Delete", "Retain"]},
                       "operatingMode": {"enum": ["Running", "Suspended"]}}},
    (kube.SANDBOX_EXT_GROUP, "SandboxTemplate"): {
        "type": "object", "required": ["podTemplate"], "additionalProperties": False,
        "properties": {"podTemplate": _POD_TEMPLATE, "volumeClaimTemplates": _CLAIM_TEMPLATES,
                       "service": {"type": "boolean"},
                       "networkPolicy": {"type": "object", "additionalProperties": False,
                                         "properties": {"ingress": {"type": "array"}, "egress": {"type": "array"}}},
                       "networkPolicyManagement": {"enum": ["Managed", "Unmanaged"]},
                       "envVarsInjectionPolicy": _POLICY, "volumeClaimTemplatesPolicy": _POLICY}},
    (kube.SANDBOX_EXT_GROUP, "SandboxClaim"): {
        "type": "object", "required": ["warmPoolRef"], "additionalProperties": False,
        "properties": {"warmPoolRef": _REF,
                       "lifecycle": {"type": "object", "additionalProperties": False, "properties": {
                           "shutdownTime": {"type": "string", "format": "date-time"},
                           "shutdownPolicy": {"enum": ["Delete", "DeleteForeground", "Retain"]},
                           "ttlSecondsAfterFinished": {"type": "integer", "minimum": 0, "maximum": 2**31 - 1}}},
                       "additionalPodMetadata": {"type": "object", "additionalProperties": False,
                                                 "properties": {"labels": _STRINGS, "annotations": _STRINGS}},
                       "env": {"type": "array", "items": {
                           "type": "object", "required": ["name", "value"], "additionalProperties": False,
                           "properties": {"name": {"type": "string"}, "value": {"type": "string"},
                                          "containerName": {"type": "string"}}}},
                       "volumeClaimTemplates": _CLAIM_TEMPLATES}},
    (kube.SANDBOX_EXT_GROUP, "SandboxWarmPool"): {
        "type": "object", "required": ["sandboxTemplateRef"], "additionalProperties": False,
        "properties": {"sandboxTemplateRef": _REF,
                       "replicas": {"type": "integer", "minimum": 0, "maximum": 2**31 - 1},
                       "updateStrategy": {"type": "object", "additionalProperties": False,
                                          "properties": {"type": {"enum": ["Recreate", "OnReplenish"]}}}}},
}


def _resource(api_version: str, kind: str, spec: Obj) -> Obj:
    return {"type": "object", "required": ["apiVersion", "kind", "metadata", "spec"], "additionalProperties": False,
            "properties": {"apiVersion": {"const": api_version}, "kind": {"const": kind},
                           "metadata": {"type": "object", "required": ["name"],
                                        "properties": {"name": {"type": "string"}, "namespace": {"type": "string"},
                                                       "labels": _STRINGS, "annotations": _STRINGS}},
                           "spec": spec}}


def validate(obj: Obj) -> str:
    """Raise (jsonschema's or kubernetes-validate's ValidationError) unless ``obj`` is valid; returns what
    it was checked against."""
    import jsonschema
    import kubernetes_validate

    key = (obj.get("apiVersion"), obj.get("kind"))
    if key not in SPECS:
        return "kubernetes " + str(kubernetes_validate.validate(obj, kube.K8S_VERSION, strict=True))
    api_version, kind = key
    jsonschema.Draft202012Validator(_resource(str(api_version), str(kind), SPECS[key]),
                                    format_checker=jsonschema.FormatChecker()).validate(obj)
    spec = obj["spec"]
    template = spec.get("podTemplate")
    if template is not None:  # the embedded pod, as the Pod it becomes
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "Pod",
                                      "metadata": {"name": "x", **template.get("metadata", {})},
                                      "spec": template["spec"]}, kube.K8S_VERSION, strict=True)
    rules = spec.get("networkPolicy")
    if rules is not None:  # the managed NetworkPolicy's rules, as a NetworkPolicy
        kubernetes_validate.validate({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                                      "metadata": {"name": "x"},
                                      "spec": {"podSelector": {}, "policyTypes": ["Ingress", "Egress"], **rules}},
                                     kube.K8S_VERSION, strict=True)
    return f"agent-sandbox {api_version} {kind}"
