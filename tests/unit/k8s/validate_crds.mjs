// Validates custom resources (KEDA's, the Prometheus Operator's) against their CRDs' OpenAPI schemas, as the
// @kubernetes-models packages from the npm registry carry them. Usage: node validate_crds.mjs < resources.json
// Reads a JSON array of resources; prints a JSON object {"<kind>/<name>": "<error or ok>"}; exits 0.
import { readFileSync } from "node:fs";
import { ScaledObject } from "@kubernetes-models/keda/keda.sh/v1alpha1/ScaledObject";
import { TriggerAuthentication } from "@kubernetes-models/keda/keda.sh/v1alpha1/TriggerAuthentication";
import { ServiceMonitor } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/ServiceMonitor";

const models = {
  "keda.sh/v1alpha1/ScaledObject": ScaledObject,
  "keda.sh/v1alpha1/TriggerAuthentication": TriggerAuthentication,
  "monitoring.coreos.com/v1/ServiceMonitor": ServiceMonitor,
};
const results = {};
for (const resource of JSON.parse(readFileSync(0, "utf8"))) {
  const name = `${resource.kind}/${resource.metadata?.name}`;
  const Model = models[`${resource.apiVersion}/${resource.kind}`];
  if (!Model) {
    results[name] = "no schema for " + `${resource.apiVersion}/${resource.kind}`;
    continue;
  }
  try {
    new Model(resource).validate();
    results[name] = "ok";
  } catch (error) {
    results[name] = String(error.message || error);
  }
}
console.log(JSON.stringify(results));
