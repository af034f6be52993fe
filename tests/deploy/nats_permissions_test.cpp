// deploy/nats's users and permissions on a real nats-server: anonymous clients are refused, and a
// node agent's user reaches its own node's work only: not another node's work (by its durable, by
// a durable of its own name filtered to the other node, by an ordered read, or by a core
// subscription), not another user's inbox, not another node's status, and it cannot delete a
// stream. The services' end-to-end run with these users is tests/deploy/stack_test.py.
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <map>
#include <mutex>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>
#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>

#include "cvm/base/wire.h"
#include "cvm/bus/bus.h"
#include "cvm/service/streams.h"
#include "cvm/test/files.h"
#include "cvm/test/nats_server.h"
#include "cvm/test/wait.h"

namespace cvm::test {
namespace {

namespace fs = std::filesystem;
using namespace std::chrono_literals;

// Runs deploy/nats/gen-auth.sh for nodes n1 and n2 into a temp directory.
struct GeneratedAuth {
  std::string dir;
  std::string auth_conf;
  std::map<std::string, std::string> passwords;  // user -> password

  GeneratedAuth() {
    dir = fs::temp_directory_path() / ("cvm-auth-" + std::to_string(getpid()));
    fs::remove_all(dir);
    const std::string cmd =
        std::string(CVM_GEN_AUTH) + " --out " + dir + " --user alice --user bob n1 n2 >/dev/null";
    if (std::system(cmd.c_str()) != 0) return;
    auth_conf = read_file(dir + "/auth.conf");
    for (const auto& entry : fs::directory_iterator(dir + "/credentials")) {
      std::istringstream in(read_file(entry.path()));
      std::string user;
      std::string password;
      for (std::string line; std::getline(in, line);) {
        if (line.rfind("CVM_NATS_USER=", 0) == 0) user = line.substr(14);
        if (line.rfind("CVM_NATS_PASSWORD=", 0) == 0) password = line.substr(18);
      }
      passwords[user] = password;
    }
  }
  ~GeneratedAuth() { fs::remove_all(dir); }
};

class NatsPermissions : public ::testing::Test {
 protected:
  static void SetUpTestSuite() { auth_ = new GeneratedAuth(); }
  static void TearDownTestSuite() { delete auth_; }

  void SetUp() override {
    ASSERT_FALSE(auth_->auth_conf.empty()) << "gen-auth.sh failed";
    ASSERT_EQ(auth_->passwords.size(), 8u);
    server_.emplace(NatsServerOptions{.extra_config = auth_->auth_conf});
    auto started = server_->start();
    ASSERT_TRUE(started.ok()) << started.error().message;
    io_thread_ = std::thread([this] { io_.run(); });
    // The services' view of the world: streams and buckets made by their own users.
    scheduler_ = connect("scheduler");
    ASSERT_TRUE(scheduler_);
    ASSERT_TRUE(service::ensure_streams(*scheduler_).ok());
    ASSERT_TRUE(scheduler_->ensure_kv(service::nodes_bucket()).ok());
  }

  void TearDown() override {
    scheduler_.reset();
    work_.reset();
    io_thread_.join();
  }

  bus::ConnectionPtr connect(const std::string& user, std::string password = {}) {
    bus::ConnectOptions o;
    o.url = server_->url();
    o.name = user;
    o.user = user;
    o.password = password.empty() && !user.empty() ? auth_->passwords[user] : password;
    o.retry_on_failed_connect = false;
    o.max_reconnect = 0;
    o.on_error = [this, user](const Error& e) {
      std::lock_guard lock(mu_);
      errors_[user].push_back(e.message);
    };
    auto c = bus::Connection::connect(o, io_.get_executor());
    return c.ok() ? *c : nullptr;
  }

  // Did the server tell `user` it was refused something matching `text`?
  bool refused(const std::string& user, const std::string& text) {
    return wait_until(
        [&] {
          std::lock_guard lock(mu_);
          for (const auto& e : errors_[user]) {
            if (e.find("ermission") != std::string::npos && e.find(text) != std::string::npos) {
              return true;
            }
          }
          return false;
        },
        5s);
  }

  void publish_work(const std::string& node, const std::string& payload) {
    auto ack = scheduler_->js_publish(wire::node_work_subject(node), payload);
    ASSERT_TRUE(ack.ok()) << ack.error().message;
  }

  static inline GeneratedAuth* auth_ = nullptr;
  std::optional<NatsServer> server_;
  boost::asio::io_context io_;
  std::optional<boost::asio::executor_work_guard<boost::asio::io_context::executor_type>> work_{
      boost::asio::make_work_guard(io_)};
  std::thread io_thread_;
  std::mutex mu_;
  std::map<std::string, std::vector<std::string>> errors_;
  bus::ConnectionPtr scheduler_;
};

TEST_F(NatsPermissions, AnonymousAndWrongPasswordsAreRefused) {
  EXPECT_FALSE(connect(""));
  EXPECT_FALSE(connect("agent-n1", "not-the-password"));
  EXPECT_FALSE(connect("nobody", "x"));
  EXPECT_TRUE(connect("agent-n1"));
}

TEST_F(NatsPermissions, AnAgentConsumesItsOwnWorkOnly) {
  publish_work("n1", "for-n1");
  publish_work("n2", "for-n2");
  auto agent = connect("agent-n1");
  ASSERT_TRUE(agent);

  std::mutex mu;
  std::vector<std::string> got;
  auto own = agent->pull_consume({.stream = std::string(wire::kStreamNodeWork),
                                  .durable = wire::agent_durable("n1"),
                                  .filter_subject = wire::node_work_subject("n1")},
                                 [&](bus::JsMessagePtr m) {
                                   std::lock_guard lock(mu);
                                   got.emplace_back(m->data());
                                   (void)m->ack();
                                 });
  ASSERT_TRUE(own.ok()) << own.error().message;
  ASSERT_TRUE(wait_until([&] {
    std::lock_guard lock(mu);
    return !got.empty();
  }));

  // n2's durable, and a durable of n1's own name but filtered to n2's work: both refused.
  auto other = agent->pull_consume({.stream = std::string(wire::kStreamNodeWork),
                                    .durable = wire::agent_durable("n2"),
                                    .filter_subject = wire::node_work_subject("n2")},
                                   [&](bus::JsMessagePtr m) {
                                     std::lock_guard lock(mu);
                                     got.emplace_back(m->data());
                                   });
  EXPECT_FALSE(other.ok());
  auto renamed = agent->pull_consume({.stream = std::string(wire::kStreamNodeWork),
                                      .durable = "agent-n1-too",
                                      .filter_subject = wire::node_work_subject("n2")},
                                     [&](bus::JsMessagePtr) {});
  EXPECT_FALSE(renamed.ok());
  // An ordered (ephemeral) read of n2's work, and a plain subscription to its subject.
  auto reader =
      agent->read_stream(std::string(wire::kStreamNodeWork), wire::node_work_subject("n2"));
  if (reader.ok()) {
    auto m = (*reader)->next(1s);
    EXPECT_FALSE(m.ok() && m->has_value()) << "read n2's work through an ordered consumer";
  }
  auto sub = agent->subscribe(wire::node_work_subject("n2"), "", [&](bus::Message m) {
    std::lock_guard lock(mu);
    got.push_back(m.data);
  });
  EXPECT_TRUE(refused("agent-n1", "cvm.v1.node.n2.work"));
  publish_work("n2", "for-n2-again");

  // Meanwhile its own work keeps flowing.
  publish_work("n1", "for-n1-again");
  ASSERT_TRUE(wait_until([&] {
    std::lock_guard lock(mu);
    return got.size() >= 2;
  }));
  std::this_thread::sleep_for(300ms);  // let anything that leaked arrive before looking
  std::lock_guard lock(mu);
  EXPECT_EQ(got, (std::vector<std::string>{"for-n1", "for-n1-again"}));
}

TEST_F(NatsPermissions, AnAgentCannotDeleteOrPurgeAStream) {
  auto agent = connect("agent-n1");
  ASSERT_TRUE(agent);
  for (const std::string api :
       {"$JS.API.STREAM.DELETE.CVM_NODE_WORK", "$JS.API.STREAM.PURGE.CVM_NODE_WORK",
        "$JS.API.STREAM.DELETE.CVM_EVENTS"}) {
    auto reply = agent->request(api, "", 1s);
    EXPECT_FALSE(reply.ok() && reply->data.find("\"success\":true") != std::string::npos) << api;
  }
  EXPECT_TRUE(refused("agent-n1", "STREAM.DELETE"));
  publish_work("n1", "still-here");
  auto state = scheduler_->stream_state(std::string(wire::kStreamNodeWork));
  ASSERT_TRUE(state.ok()) << state.error().message;
  EXPECT_EQ(state->messages, 1u);
  EXPECT_TRUE(scheduler_->stream_state(std::string(wire::kStreamEvents)).ok());
}

// The streams are the scheduler's: an agent can use them but never make one (it could give it any
// retention when it is absent).
TEST_F(NatsPermissions, AnAgentCannotCreateAStream) {
  auto agent = connect("agent-n1");
  ASSERT_TRUE(agent);
  for (const std::string api :
       {"$JS.API.STREAM.CREATE.CVM_EVENTS", "$JS.API.STREAM.CREATE.CVM_NODE_WORK"}) {
    auto reply = agent->request(api, R"({"name":"x","subjects":["x"],"max_msgs":1})", 1s);
    EXPECT_FALSE(reply.ok() && reply->data.find("\"error\"") == std::string::npos) << api;
  }
  EXPECT_TRUE(refused("agent-n1", "STREAM.CREATE.CVM_EVENTS"));
  EXPECT_TRUE(refused("agent-n1", "STREAM.CREATE.CVM_NODE_WORK"));
  // Made by the scheduler, they are the agent's to use.
  EXPECT_TRUE(agent->ensure_stream(service::events_stream()).ok());
  EXPECT_TRUE(agent->ensure_stream(service::node_work_stream()).ok());
}

// The monitoring user reads backlogs and node and GPU state, and can change nothing: it cannot
// delete the scheduler's consumer (which would stop placements) nor read a build or an assignment.
TEST_F(NatsPermissions, TheExporterReadsBacklogsButNoMessagesAndDeletesNothing) {
  // The scheduler's durable, as the scheduler makes it.
  auto consumer = scheduler_->pull_consume({.stream = std::string(wire::kStreamBuilds),
                                            .durable = std::string(wire::kSchedulerDurable),
                                            .filter_subject = std::string(wire::kBuildsSubmit)},
                                           [](bus::JsMessagePtr m) { (void)m->ack(); });
  ASSERT_TRUE(consumer.ok()) << consumer.error().message;
  const auto has_scheduler = [](const Result<std::vector<bus::ConsumerState>>& states) {
    return states.ok() && std::any_of(states->begin(), states->end(), [](const auto& c) {
             return c.name == wire::kSchedulerDurable;
           });
  };
  auto exporter = connect("exporter");
  ASSERT_TRUE(exporter);
  auto backlogs = exporter->consumer_states(std::string(wire::kStreamBuilds));
  ASSERT_TRUE(backlogs.ok()) << backlogs.error().message;
  EXPECT_TRUE(has_scheduler(backlogs));
  EXPECT_TRUE(exporter->consumer_states(std::string(wire::kStreamNodeWork)).ok());
  publish_work("n1", "an assignment");
  auto del = exporter->request("$JS.API.CONSUMER.DELETE.CVM_BUILDS.scheduler", "", 1s);
  EXPECT_FALSE(del.ok() && del->data.find("\"success\":true") != std::string::npos);
  EXPECT_TRUE(refused("exporter", "CONSUMER.DELETE.CVM_BUILDS.scheduler"));
  for (const std::string stream : {"CVM_BUILDS", "CVM_NODE_WORK"}) {
    auto got = exporter->request("$JS.API.STREAM.MSG.GET." + stream, R"({"seq":1})", 1s);
    EXPECT_FALSE(got.ok() && got->data.find("\"message\"") != std::string::npos) << stream;
    EXPECT_TRUE(refused("exporter", "STREAM.MSG.GET." + stream)) << stream;
  }
  (void)exporter->publish("$KV.cvm_nodes.n1", "forged");
  EXPECT_TRUE(refused("exporter", "$KV.cvm_nodes.n1"));
  // The scheduler's consumer is still there.
  EXPECT_TRUE(has_scheduler(exporter->consumer_states(std::string(wire::kStreamBuilds))));
}

// GPU releases carry the node: an agent publishes on its own node's subject only, and the broker
// (which checks each lease against that token) hears it there.
TEST_F(NatsPermissions, AnAgentReleasesGpusOnItsOwnNodesSubjectOnly) {
  auto broker = connect("gpu-broker");
  auto agent = connect("agent-n1");
  ASSERT_TRUE(broker && agent);
  std::mutex mu;
  std::vector<std::string> heard;
  auto sub = broker->subscribe(std::string(wire::kGpuReleaseNodeWildcard), "", [&](bus::Message m) {
    std::lock_guard lock(mu);
    heard.push_back(m.subject);
  });
  ASSERT_TRUE(sub.ok()) << sub.error().message;
  ASSERT_TRUE(broker->flush().ok());
  ASSERT_TRUE(agent->publish(wire::gpu_release_subject("n1"), "release").ok());
  (void)agent->publish(wire::gpu_release_subject("n2"), "forged");
  (void)agent->publish(std::string(wire::kGpuRelease), "any node");
  EXPECT_TRUE(refused("agent-n1", "cvm.v1.gpu.release.n2"));
  EXPECT_TRUE(refused("agent-n1", "\"cvm.v1.gpu.release\""));
  ASSERT_TRUE(wait_until([&] {
    std::lock_guard lock(mu);
    return !heard.empty();
  }));
  std::this_thread::sleep_for(200ms);  // what else would arrive, has
  std::lock_guard lock(mu);
  EXPECT_EQ(heard, (std::vector<std::string>{"cvm.v1.gpu.release.n1"}));
}

TEST_F(NatsPermissions, AnAgentCannotReadOtherInboxes) {
  auto agent = connect("agent-n1");
  ASSERT_TRUE(agent);
  std::mutex mu;
  std::vector<std::string> leaked;
  std::vector<bus::Subscription> subs;
  for (const std::string subject : {"_INBOX.>", "_INBOX_scheduler.>", "_INBOX_agent-n2.>", ">"}) {
    auto s = agent->subscribe(subject, "", [&](bus::Message m) {
      std::lock_guard lock(mu);
      leaked.push_back(m.subject);
    });
    if (s.ok()) subs.push_back(std::move(*s));
  }
  EXPECT_TRUE(refused("agent-n1", "_INBOX_scheduler.>"));
  // The scheduler asks the broker for GPUs; the reply travels to the scheduler's inbox.
  auto broker = connect("gpu-broker");
  ASSERT_TRUE(broker);
  auto responder = broker->subscribe(std::string(wire::kGpuReserve), "gpu-broker",
                                     [&](bus::Message m) { (void)broker->publish(m.reply, "ok"); });
  ASSERT_TRUE(responder.ok());
  ASSERT_TRUE(broker->flush().ok());
  auto reply = scheduler_->request(std::string(wire::kGpuReserve), "req", 5s);
  ASSERT_TRUE(reply.ok()) << reply.error().message;
  EXPECT_EQ(reply->data, "ok");
  // Its own inbox still works: a request of its own gets its reply.
  auto own = agent->request(wire::gpu_release_subject("n1"), "rel", 1s);
  EXPECT_TRUE(own.ok() || own.error().domain == ErrorDomain::kNotFound) << own.error().message;
  std::this_thread::sleep_for(300ms);
  std::lock_guard lock(mu);
  EXPECT_TRUE(leaked.empty()) << leaked.front();
}

TEST_F(NatsPermissions, AnAgentWritesItsOwnStatusOnly) {
  auto agent = connect("agent-n1");
  ASSERT_TRUE(agent);
  auto kv = agent->ensure_kv(service::nodes_bucket());
  ASSERT_TRUE(kv.ok()) << kv.error().message;
  EXPECT_TRUE(kv->put("n1", "status").ok());
  EXPECT_FALSE(kv->put("n2", "forged").ok());
  auto check = scheduler_->ensure_kv(service::nodes_bucket());
  ASSERT_TRUE(check.ok());
  auto n2 = check->get("n2");
  ASSERT_TRUE(n2.ok());
  EXPECT_FALSE(n2->has_value());
  // Nor may it submit builds or assign work.
  EXPECT_FALSE(agent->js_publish(std::string(wire::kBuildsSubmit), "x", "", {}, 1s).ok());
  EXPECT_FALSE(agent->js_publish(wire::node_work_subject("n2"), "x", "", {}, 1s).ok());
}

TEST_F(NatsPermissions, CvmctlSubmitsAndReadsButCannotAssignWork) {
  auto ctl = connect("cvmctl");
  ASSERT_TRUE(ctl);
  auto submitted = ctl->js_publish(std::string(wire::kBuildsSubmit), "x", "b1");
  ASSERT_TRUE(submitted.ok()) << submitted.error().message;
  EXPECT_FALSE(ctl->js_publish(wire::node_work_subject("n1"), "x", "", {}, 1s).ok());
  // dead-letters: the stream (the scheduler made it) and its records by sequence, and a request
  // of CVM_BUILDS by sequence.
  ASSERT_TRUE(scheduler_->ensure_stream(service::dead_letters_stream()).ok());
  const std::string letters(service::kStreamDeadLetters);
  EXPECT_TRUE(ctl->stream_state(letters).ok());
  auto letter = ctl->message_at(letters, 1);
  EXPECT_TRUE(letter.ok() && !letter->has_value()) << "none yet: nullopt, not a refusal";
  auto request = ctl->message_at(std::string(wire::kStreamBuilds), submitted->sequence);
  ASSERT_TRUE(request.ok()) << request.error().message;
  EXPECT_TRUE(request->has_value());
  auto settings = ctl->ensure_kv(service::settings_bucket());
  ASSERT_TRUE(settings.ok()) << settings.error().message;
  EXPECT_TRUE(settings->put(std::string(wire::kSettingsKey), "").ok());
  auto nodes = ctl->ensure_kv(service::nodes_bucket());
  ASSERT_TRUE(nodes.ok()) << nodes.error().message;
  EXPECT_TRUE(nodes->keys().ok());
  EXPECT_FALSE(nodes->put("n1", "forged").ok());
  auto events =
      ctl->read_stream(std::string(wire::kStreamEvents), wire::build_events_subject("b1"));
  EXPECT_TRUE(events.ok()) << events.error().message;
  EXPECT_TRUE(ctl->consumer_states(std::string(wire::kStreamBuilds)).ok());
}

TEST_F(NatsPermissions, AnAgentAnswersConsoleRequestsForItsOwnNodeOnly) {
  auto agent = connect("agent-n1");
  auto ctl = connect("cvmctl");
  auto alice = connect("alice");
  ASSERT_TRUE(agent && ctl && alice);
  std::atomic<int> asked{0};
  auto own = agent->subscribe(wire::node_console_wildcard("n1"), "", [&](bus::Message m) {
    ++asked;
    (void)agent->publish(m.reply, "log for " + m.subject.substr(m.subject.rfind('.') + 1));
  });
  ASSERT_TRUE(own.ok()) << own.error().message;
  ASSERT_TRUE(agent->flush().ok());
  auto reply = ctl->request(wire::node_console_subject("n1", "cvmctl"), "req", 5s);
  ASSERT_TRUE(reply.ok()) << reply.error().message;
  EXPECT_EQ(reply->data, "log for cvmctl");
  reply = alice->request(wire::node_console_subject("n1", "alice"), "req", 5s);
  ASSERT_TRUE(reply.ok()) << reply.error().message;
  EXPECT_EQ(reply->data, "log for alice");
  // The user token is who asks: nobody asks as another, so the agent may judge by it.
  EXPECT_FALSE(alice->request(wire::node_console_subject("n1", "bob"), "req", 1s).ok());
  EXPECT_TRUE(refused("alice", "cvm.v1.node.n1.console.bob"));
  EXPECT_FALSE(ctl->request(wire::node_console_subject("n1", "alice"), "req", 1s).ok());
  EXPECT_TRUE(refused("cvmctl", "cvm.v1.node.n1.console.alice"));
  EXPECT_EQ(asked.load(), 2);
  // Another node's console requests are not its to see.
  auto other = agent->subscribe(wire::node_console_wildcard("n2"), "", [](bus::Message) {});
  (void)agent->flush();
  EXPECT_TRUE(refused("agent-n1", "cvm.v1.node.n2.console.*"));
  // cvmctl finds the node in cvm_workspaces, which it may read but not write.
  auto agent_kv = agent->ensure_kv(service::workspaces_bucket());
  ASSERT_TRUE(agent_kv.ok()) << agent_kv.error().message;
  ASSERT_TRUE(agent_kv->put("ws1", "record").ok());
  auto kv = ctl->ensure_kv(service::workspaces_bucket());
  ASSERT_TRUE(kv.ok()) << kv.error().message;
  auto got = kv->get("ws1");
  ASSERT_TRUE(got.ok()) << got.error().message;
  ASSERT_TRUE(got->has_value());
  EXPECT_EQ((*got)->value, "record");
  EXPECT_FALSE(kv->put("ws1", "forged").ok());
}

// Sessions: the user token of the session subjects is pinned to the user, so an agent may take it
// as who asks; an agent serves and sees its own node's sessions only.
TEST_F(NatsPermissions, SessionSubjectsCarryAUserOnlyThatUserMayUse) {
  auto agent = connect("agent-n1");
  auto alice = connect("alice");
  auto bob = connect("bob");
  ASSERT_TRUE(agent && alice && bob);
  auto opens = agent->subscribe(wire::session_open_wildcard("n1"), "",
                                [&](bus::Message m) { (void)agent->publish(m.reply, m.subject); });
  ASSERT_TRUE(opens.ok()) << opens.error().message;
  std::mutex mu;
  std::vector<std::string> input;
  auto in = agent->subscribe(wire::session_in_wildcard("n1"), "", [&](bus::Message m) {
    std::lock_guard lock(mu);
    input.push_back(m.subject);
  });
  ASSERT_TRUE(in.ok()) << in.error().message;
  ASSERT_TRUE(agent->flush().ok());

  // alice opens as alice; the agent sees her name in the subject.
  auto asked = alice->request(wire::session_open_subject("n1", "alice"), "open", 5s);
  ASSERT_TRUE(asked.ok()) << asked.error().message;
  EXPECT_EQ(asked->data, "cvm.v1.node.n1.open.alice");
  // She cannot open, type into or read a session as bob.
  EXPECT_FALSE(alice->request(wire::session_open_subject("n1", "bob"), "open", 1s).ok());
  EXPECT_TRUE(refused("alice", "cvm.v1.node.n1.open.bob"));
  (void)alice->publish(wire::session_in_subject("n1", "bob", "s1"), "keys");
  EXPECT_TRUE(refused("alice", "cvm.v1.node.n1.session.bob.s1.in"));
  auto peek =
      alice->subscribe(wire::session_out_subject("n1", "bob", "s1"), "", [](bus::Message) {});
  (void)alice->flush();
  EXPECT_TRUE(refused("alice", "cvm.v1.node.n1.session.bob.s1.out"));

  // bob's output reaches bob.
  std::atomic<int> got{0};
  auto out = bob->subscribe(wire::session_out_subject("n1", "bob", "s2"), "",
                            [&](bus::Message) { got.fetch_add(1); });
  ASSERT_TRUE(out.ok()) << out.error().message;
  ASSERT_TRUE(bob->flush().ok());
  ASSERT_TRUE(agent->publish(wire::session_out_subject("n1", "bob", "s2"), "out").ok());
  EXPECT_TRUE(wait_until([&] { return got.load() == 1; }, 5s));
  ASSERT_TRUE(bob->publish(wire::session_in_subject("n1", "bob", "s2"), "keys").ok());
  EXPECT_TRUE(wait_until(
      [&] {
        std::lock_guard lock(mu);
        return input.size() == 1;
      },
      5s));

  // Another node's agent can neither open a session here (as anyone) nor speak for this node.
  auto other = connect("agent-n2");
  ASSERT_TRUE(other);
  EXPECT_FALSE(other->request(wire::session_open_subject("n1", "alice"), "open", 1s).ok());
  EXPECT_TRUE(refused("agent-n2", "cvm.v1.node.n1.open.alice"));
  (void)other->publish(wire::session_out_subject("n1", "bob", "s2"), "forged");
  EXPECT_TRUE(refused("agent-n2", "cvm.v1.node.n1.session.bob.s2.out"));
  auto listen = other->subscribe(wire::session_in_wildcard("n1"), "", [](bus::Message) {});
  (void)other->flush();
  EXPECT_TRUE(refused("agent-n2", "cvm.v1.node.n1.session.*.*.in"));
  EXPECT_EQ(got.load(), 1) << "the forged output did not reach bob";
}

}  // namespace
}  // namespace cvm::test
