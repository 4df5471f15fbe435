#!/usr/bin/env node
// Run by npm after `npm ci` / `npm install` (the postinstall script of package.json).
//
// The pinned local Cosmos DB server refuses every patch path whose first segment starts
// with "_"; Cosmos DB itself refuses only its system properties (_rid, _self, _etag,
// _attachments, _ts). flowcraft keeps context keys such as "_outputs.<node>" at the top
// level of an item, so this narrows the server's check to the system properties.
// Idempotent; fails loudly when the installed server is not the version it knows.
"use strict";

const fs = require("fs");
const path = require("path");

const PACKAGE = "@vercel/cosmosdb-server";
const VERSION = "1.0.1";
const MARK = "/* flowcraft: only system properties are refused */";

const root = path.join(__dirname, "node_modules", ...PACKAGE.split("/"));
const file = path.join(root, "lib", "handler", "_patch-operations.js");

function fail(message) {
  console.error(`patch-cosmosdb-server: ${message}`);
  process.exit(1);
}

if (!fs.existsSync(file)) {
  fail(`${file} not found: is ${PACKAGE} installed (npm ci in tools/local-services)?`);
}
const { version } = JSON.parse(fs.readFileSync(path.join(root, "package.json"), "utf8"));
if (version !== VERSION) {
  fail(`${PACKAGE} is ${version}, this patch is for ${VERSION}: check that its patch ` +
       `check still refuses every "/_" path, then update this script`);
}

let source = fs.readFileSync(file, "utf8");
if (source.includes(MARK)) {
  process.exit(0); // already patched
}

const helper = `${MARK}
const SYSTEM_PROPERTIES = new Set(["_rid", "_self", "_etag", "_attachments", "_ts"]);
function systemProperty(pointer) {
    const first = pointer.slice(1).split("/")[0].replace(/~1/g, "/").replace(/~0/g, "~");
    return SYSTEM_PROPERTIES.has(first) ? first : undefined;
}
`;
const edits = [
  // the "from" of a move
  ['    if (from.startsWith("/_")) {\n        const systemProperty = from.split("/")[1];\n',
   '    if (systemProperty(from) !== undefined) {\n        const systemProperty = from.split("/")[1];\n'],
  // the path of every operation
  ['    if (path.startsWith("/_")) {\n        const systemProperty = path.split("/")[1];\n',
   '    if (systemProperty(path) !== undefined) {\n        const systemProperty = path.split("/")[1];\n'],
  // the helper, before the first function
  ["function getValueAtPath(", `${helper}function getValueAtPath(`],
];
for (const [before, after] of edits) {
  const count = source.split(before).length - 1;
  if (count !== 1) {
    fail(`expected the text ${JSON.stringify(before)} once in ${file}, found it ${count} times`);
  }
  source = source.replace(before, after);
}
fs.writeFileSync(file, source);
console.log(`patch-cosmosdb-server: ${PACKAGE} ${VERSION} now refuses patches of system properties only`);
