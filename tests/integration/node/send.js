// A platform written in Node.js: celery-node sends item.check messages (protocol 2, JSON), as the README shows.
// Usage: node send.js BROKER_URL PREFIX COUNT IMAGE_B64
const celery = require("celery-node");

async function main() {
  const [broker, prefix, count, image] = process.argv.slice(2);
  const client = celery.createClient(broker, broker, "item.checks");
  for (let i = 0; i < Number(count); i++) {
    client.createTask("item.check").applyAsync([], { external_id: `${prefix}-${i}`, image: { b64: image } });
  }
  await client.isReady();
  await new Promise((resolve) => setTimeout(resolve, 2000)); // publishing is fire-and-forget: let it drain
  await client.disconnect();
}

main().then(() => process.exit(0), (error) => { console.error(error); process.exit(1); });
