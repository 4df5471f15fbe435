// The Azure guide's "Starting a Workflow (Client-Side)" snippet, from the TypeScript
// library's documentation for its Azure adapter, run as it is written, against the local
// services. Only the names are filled in from the environment, and the packages are
// resolved from tools/local-services/node_modules.
//
//   node tests/js/azure_start_workflow.mjs BLUEPRINT.json [INITIAL_CONTEXT_JSON] < context
//
// The blueprint argument is a file path or inline JSON; the initial context is the second
// argument, else standard input (empty: {}). Environment: COSMOS_DB_CONNECTION_STRING,
// AZURE_STORAGE_CONNECTION_STRING, FLOWCRAFT_QUEUE_NAME, FLOWCRAFT_COSMOS_DATABASE,
// FLOWCRAFT_CONTEXT_CONTAINER, FLOWCRAFT_STATUS_CONTAINER. The local Cosmos server's
// certificate is self-signed: run with NODE_TLS_REJECT_UNAUTHORIZED=0 (this process only).
// Prints the snippet's "Workflow <runId> started." line.

import { readFileSync } from 'node:fs'
import { createRequire } from 'node:module'
import { dirname, join, resolve } from 'node:path'
import { fileURLToPath, pathToFileURL } from 'node:url'

const repo = resolve(dirname(fileURLToPath(import.meta.url)), '..', '..')
const toolsPackage = process.env.FLOWCRAFT_LOCAL_SERVICES_DIR
	? join(process.env.FLOWCRAFT_LOCAL_SERVICES_DIR, 'package.json')
	: join(repo, 'tools', 'local-services', 'package.json')
const require = createRequire(toolsPackage)

// `flowcraft` (the reference) is an ES module only package: import its entry point.
async function importEsm(name) {
	for (const base of require.resolve.paths(name) ?? []) {
		let manifest
		try {
			manifest = JSON.parse(readFileSync(join(base, name, 'package.json'), 'utf8'))
		} catch {
			continue
		}
		const entry = manifest.exports?.['.']?.import ?? manifest.module ?? manifest.main
		return import(pathToFileURL(join(base, name, entry)).href)
	}
	throw new Error(`cannot find package ${name} from ${toolsPackage}`)
}

const { analyzeBlueprint } = await importEsm('flowcraft')
const { CosmosClient } = require('@azure/cosmos')
const { QueueClient } = require('@azure/storage-queue')

function required(name) {
	const value = process.env[name]
	if (!value) throw new Error(`${name} is not set`)
	return value
}

// ---- the guide's snippet (names from the environment instead of the placeholders) ---------

async function startWorkflow(blueprint, initialContext) {
	const runId = crypto.randomUUID()
	const cosmosClient = new CosmosClient(process.env.COSMOS_DB_CONNECTION_STRING)
	const queueClient = new QueueClient(process.env.AZURE_STORAGE_CONNECTION_STRING, required('FLOWCRAFT_QUEUE_NAME'))

	// 1. Set initial context and status in Cosmos DB
	const db = cosmosClient.database(required('FLOWCRAFT_COSMOS_DATABASE'))
	await db.container(required('FLOWCRAFT_CONTEXT_CONTAINER')).items.create({ id: runId, ...initialContext })
	await db.container(required('FLOWCRAFT_STATUS_CONTAINER')).items.create({ id: runId, status: 'running', lastUpdated: new Date().toISOString() })

	// 2. Analyze blueprint for start nodes
	const analysis = analyzeBlueprint(blueprint)
	const startJobs = analysis.startNodeIds.map(nodeId =>
		queueClient.sendMessage(JSON.stringify({ runId, blueprintId: blueprint.id, nodeId })),
	)

	// 3. Enqueue start jobs
	await Promise.all(startJobs)
	console.log(`Workflow ${runId} started.`)
	return runId
}

// ---- command line -------------------------------------------------------------------------

function readJson(text, what) {
	try {
		return JSON.parse(text)
	} catch (error) {
		throw new Error(`${what} is not valid JSON: ${error.message}`)
	}
}

const [blueprintArgument, contextArgument] = process.argv.slice(2)
if (!blueprintArgument) {
	console.error('usage: azure_start_workflow.mjs BLUEPRINT.json [INITIAL_CONTEXT_JSON] < context')
	process.exit(2)
}
const blueprint = readJson(
	blueprintArgument.trim().startsWith('{') ? blueprintArgument : readFileSync(blueprintArgument, 'utf8'),
	'the blueprint',
)
const contextText = contextArgument ?? (process.stdin.isTTY ? '' : readFileSync(0, 'utf8'))
const initialContext = contextText.trim() ? readJson(contextText, 'the initial context') : {}

try {
	await startWorkflow(blueprint, initialContext)
} catch (error) {
	console.error(`startWorkflow failed: ${error?.stack ?? error}`)
	process.exit(1)
}
