// Validates an AsyncAPI document with the AsyncAPI initiative's own parser (the one its CLI uses):
// the spec's JSON Schema, references, and its semantic rules. Prints every diagnostic; exit 1 on an error.
import { Parser, fromFile } from "@asyncapi/parser";

const path = process.argv[2];
const { document, diagnostics } = await fromFile(new Parser(), path).parse();
const severities = ["error", "warning", "info", "hint"];
for (const d of diagnostics) {
  console.log(`${severities[d.severity]} ${d.code} at ${d.path.join(".") || "/"}: ${d.message}`);
}
const errors = diagnostics.filter((d) => d.severity === 0);
if (!document || errors.length) {
  console.log(`${path}: INVALID (${errors.length} error(s))`);
  process.exit(1);
}
console.log(`${path}: valid AsyncAPI ${document.version()}`);
