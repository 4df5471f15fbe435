// The "Starting a Workflow (Client-Side)" snippet of the reference's AWS adapter docs
// (the AWS guide's client snippet), run by tests/test_aws_typescript_client.py against moto.
//
//   node tests/js/aws_start_workflow.mjs BLUEPRINT.json ['{"initial": "context"}']
//
// prints the run id on its last line. Only two things differ from the documentation:
// the table names may come from FLOWCRAFT_CONTEXT_TABLE / FLOWCRAFT_STATUS_TABLE (their
// defaults are the documentation's names, so nothing changes for a user who sets neither),
// and the wrapper at the bottom reads the blueprint and the initial context from argv.
// The packages resolve from tools/local-services/node_modules (the test registers a
// resolve hook with `node --import`; see tests/aws_helpers.py).

import { analyzeBlueprint } from 'flowcraft'
import { DynamoDBClient } from '@aws-sdk/client-dynamodb'
import { SQSClient, SendMessageBatchCommand } from '@aws-sdk/client-sqs'
import { DynamoDBDocumentClient, PutCommand } from '@aws-sdk/lib-dynamodb'
import { readFileSync } from 'node:fs'

const CONTEXT_TABLE = process.env.FLOWCRAFT_CONTEXT_TABLE || 'flowcraft-contexts'
const STATUS_TABLE = process.env.FLOWCRAFT_STATUS_TABLE || 'flowcraft-statuses'

// ---- the documentation's snippet (table names as above) -----------------------------------
async function startWorkflow(blueprint, initialContext) {
	const runId = crypto.randomUUID()
	const awsConfig = { region: process.env.AWS_REGION }
	const sqsClient = new SQSClient(awsConfig)
	const docClient = DynamoDBDocumentClient.from(new DynamoDBClient(awsConfig))

	// 1. Set initial context and status in DynamoDB
	await docClient.send(new PutCommand({
		TableName: CONTEXT_TABLE,
		Item: { runId, context: initialContext },
	}))
	await docClient.send(new PutCommand({
		TableName: STATUS_TABLE,
		Item: { runId, status: 'running', lastUpdated: new Date().toISOString() },
	}))

	// 2. Analyze blueprint for start nodes
	const analysis = analyzeBlueprint(blueprint)
	const startJobs = analysis.startNodeIds.map(nodeId => ({
		Id: `${runId}-${nodeId}`,
		MessageBody: JSON.stringify({ runId, blueprintId: blueprint.id, nodeId }),
	}))

	// 3. Enqueue start jobs to SQS
	await sqsClient.send(new SendMessageBatchCommand({
		QueueUrl: process.env.SQS_QUEUE_URL,
		Entries: startJobs,
	}))

	console.log(`Workflow ${runId} started.`)
	return runId
}
// --------------------------------------------------------------------------------------------

const [blueprintPath, contextJson = '{}'] = process.argv.slice(2)
if (!blueprintPath) {
	console.error('usage: node aws_start_workflow.mjs BLUEPRINT.json [INITIAL_CONTEXT_JSON]')
	process.exit(2)
}
const blueprint = JSON.parse(readFileSync(blueprintPath, 'utf8'))
const runId = await startWorkflow(blueprint, JSON.parse(contextJson))
console.log(runId)
