#pragma once
// sha256 digests of OCI blobs ("sha256:<hex>"), shared by the layout reader (layer_unpack.cpp, in
// the agent) and the layer applier (layer_apply.cpp, in cvm-unpack). Internal to the agent's
// sources; both link OpenSSL's libcrypto.

#include <openssl/evp.h>

#include <memory>
#include <string>

namespace cvm::agent::detail {

struct EvpDeleter {
  void operator()(EVP_MD_CTX* c) const { EVP_MD_CTX_free(c); }
};
using EvpCtx = std::unique_ptr<EVP_MD_CTX, EvpDeleter>;

// A context ready for EVP_DigestUpdate; null when sha256 is unavailable.
inline EvpCtx new_sha256() {
  EvpCtx ctx(EVP_MD_CTX_new());
  if (ctx && EVP_DigestInit_ex(ctx.get(), EVP_sha256(), nullptr) != 1) ctx.reset();
  return ctx;
}

// "sha256:<lowercase hex>" of what was fed to `ctx`.
inline std::string finish_sha256(EVP_MD_CTX* ctx) {
  static constexpr char kDigits[] = "0123456789abcdef";
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  EVP_DigestFinal_ex(ctx, md, &len);
  std::string out = "sha256:";
  out.reserve(out.size() + 2 * len);
  for (unsigned int i = 0; i < len; ++i) {
    out += kDigits[md[i] >> 4];
    out += kDigits[md[i] & 0xf];
  }
  return out;
}

}  // namespace cvm::agent::detail
