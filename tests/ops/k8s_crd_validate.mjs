// Validates custom resources against their CRDs' OpenAPI schemas, as compiled into the npm
// packages @kubernetes-models/keda and @kubernetes-models/prometheus-operator.
// Usage: node k8s_crd_validate.mjs NODE_MODULES_DIR < resources.json
// Input: a JSON array of resources. Output: a JSON array of
// {kind, name, package, version, error} (error null when the resource is valid).
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { pathToFileURL } from "node:url";

const PACKAGES = {
  "keda.sh": "@kubernetes-models/keda",
  "monitoring.coreos.com": "@kubernetes-models/prometheus-operator",
};

async function validate(nodeModules, resource) {
  const [group, version] = resource.apiVersion.split("/");
  const pkg = PACKAGES[group];
  const result = { kind: resource.kind, name: resource.metadata?.name, package: pkg ?? null };
  if (!pkg) return { ...result, version: null, error: `no CRD schema for group ${group}` };
  const root = join(nodeModules, pkg);
  result.version = JSON.parse(readFileSync(join(root, "package.json"))).version;
  const file = join(root, group, version, `${resource.kind}.js`);
  const model = (await import(pathToFileURL(file).href))[resource.kind];
  try {
    new model(resource).validate();
    return { ...result, error: null };
  } catch (err) {
    return { ...result, error: err.message };
  }
}

const [nodeModules] = process.argv.slice(2);
const resources = JSON.parse(readFileSync(0, "utf8"));
const results = [];
for (const resource of resources) results.push(await validate(nodeModules, resource));
process.stdout.write(JSON.stringify(results, null, 1) + "\n");
