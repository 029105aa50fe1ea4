// List one account's conversations through chat-gateway.
//
// Pages through POST /v4/recentcontact/get_list until CompleteFlag is 1, sending back
// the cursors (TimeStamp, StartIndex, TopTimeStamp, TopStartIndex) of each answer, and
// prints one line per conversation followed by a total:
//
//     <c2c|group> TAB <peer account or GroupId> TAB <MsgTime, UTC> TAB <pinned|->
//     total: N conversations (P pinned) in K pages
//
// Usage (Java 17+, no build step, no dependencies: java.net.http and a small JSON
// reader below):
//     java ListConversations.java ACCOUNT [GATEWAY_URL]
//
//     ACCOUNT       falls back to $CHAT_ACCOUNT
//     GATEWAY_URL   falls back to $CHAT_GATEWAY_URL, then http://127.0.0.1:8080
//     $CHAT_GATEWAY_TOKEN, when set, is sent as "Authorization: Bearer <token>"
//                   (needed when the gateway has server.auth_tokens).
//
// Exit status: 0 listed; 1 Chat or the gateway answered an error, or the gateway could
// not be reached; 2 usage.

import java.io.IOException;
import java.net.URI;
import java.net.http.HttpClient;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;
import java.nio.charset.StandardCharsets;
import java.time.Duration;
import java.time.Instant;
import java.util.ArrayList;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.Objects;

public class ListConversations {
    static final Duration REQUEST_TIMEOUT = Duration.ofSeconds(10);
    // HTTP 429 (the gateway's rate limit): how many times to retry a page, and the
    // wait when the answer carries no usable Retry-After.
    static final int MAX_RETRIES = 3;
    static final double DEFAULT_RETRY_SECS = 1.0;
    static final double MAX_RETRY_SECS = 30.0;
    // A guard against a cursor that never completes.
    static final int MAX_PAGES = 10_000;
    static final String[] CURSOR = {"TimeStamp", "StartIndex", "TopTimeStamp", "TopStartIndex"};

    /** An error worth one line on stderr and exit status 1. */
    static final class Failure extends Exception {
        private static final long serialVersionUID = 1L;

        Failure(String message) {
            super(message);
        }
    }

    public static void main(String[] args) {
        String usage = "usage: java ListConversations.java ACCOUNT [GATEWAY_URL]";
        if (args.length > 2 || List.of(args).contains("-h") || List.of(args).contains("--help")) {
            System.err.println(usage);
            System.exit(2);
        }
        String account = args.length > 0 ? args[0] : env("CHAT_ACCOUNT", "");
        String baseUrl = args.length > 1 && !args[1].isEmpty()
                ? args[1]
                : env("CHAT_GATEWAY_URL", "http://127.0.0.1:8080");
        if (account.isEmpty()) {
            System.err.println(usage);
            System.exit(2);
        }
        String token = env("CHAT_GATEWAY_TOKEN", "").strip();
        try {
            listConversations(baseUrl, account, token);
        } catch (Failure e) {
            System.out.flush();
            System.err.println("error: " + e.getMessage());
            System.exit(1);
        }
    }

    static String env(String name, String fallback) {
        String v = System.getenv(name);
        return v == null || v.isEmpty() ? fallback : v;
    }

    static void listConversations(String baseUrl, String account, String token) throws Failure {
        String url = baseUrl.replaceAll("/+$", "") + "/v4/recentcontact/get_list";
        HttpClient client = HttpClient.newBuilder()
                .version(HttpClient.Version.HTTP_1_1)
                .connectTimeout(REQUEST_TIMEOUT)
                .build();
        long[] cursor = {0, 0, 0, 0};
        int total = 0, pinned = 0, pages = 0;
        while (true) {
            StringBuilder body = new StringBuilder("{\"From_Account\":").append(Json.quote(account));
            for (int i = 0; i < CURSOR.length; i++) {
                body.append(",\"").append(CURSOR[i]).append("\":").append(cursor[i]);
            }
            body.append(",\"AssistFlags\":63}");
            Map<String, Object> answer = fetchPage(client, url, token, body.toString());
            pages++;
            StringBuilder lines = new StringBuilder();
            if (answer.get("SessionItem") instanceof List<?> items) {
                for (Object o : items) {
                    if (!(o instanceof Map<?, ?> item)) continue;
                    lines.append(conversationLine(item)).append('\n');
                    total++;
                    if (num(item.get("TopFlag")) == 1) pinned++;
                }
            }
            System.out.print(lines);
            if (num(answer.get("CompleteFlag")) == 1) break;
            long[] following = new long[CURSOR.length];
            for (int i = 0; i < CURSOR.length; i++) following[i] = num(answer.get(CURSOR[i]));
            if (java.util.Arrays.equals(following, cursor) || pages >= MAX_PAGES) {
                throw new Failure("get_list did not complete: cursor stuck at "
                        + java.util.Arrays.toString(following));
            }
            cursor = following;
        }
        System.out.printf("total: %d conversations (%d pinned) in %d pages%n", total, pinned, pages);
        System.out.flush();
    }

    /** One page, retrying HTTP 429 up to MAX_RETRIES times. */
    static Map<String, Object> fetchPage(HttpClient client, String url, String token, String body)
            throws Failure {
        HttpRequest.Builder req = HttpRequest.newBuilder(URI.create(url))
                .timeout(REQUEST_TIMEOUT)
                .header("Content-Type", "application/json")
                .header("Accept", "application/json")
                .POST(HttpRequest.BodyPublishers.ofString(body, StandardCharsets.UTF_8));
        if (!token.isEmpty()) req.header("Authorization", "Bearer " + token);
        HttpRequest request = req.build();
        for (int attempt = 0; ; ) {
            HttpResponse<String> resp;
            try {
                resp = client.send(request, HttpResponse.BodyHandlers.ofString(StandardCharsets.UTF_8));
            } catch (IOException e) {
                String reason = e instanceof java.net.ConnectException ? "connection refused"
                        : e.getMessage() != null ? e.getMessage() : e.getClass().getSimpleName();
                throw new Failure("cannot reach the gateway at " + url + ": " + reason);
            } catch (InterruptedException e) {
                Thread.currentThread().interrupt();
                throw new Failure("interrupted");
            }
            if (resp.statusCode() == 429 && attempt < MAX_RETRIES) {
                attempt++;
                double delay = retryDelay(resp, attempt);
                System.err.printf("rate limited (HTTP 429), retrying in %.1f s (retry %d of %d)%n",
                        delay, attempt, MAX_RETRIES);
                try {
                    Thread.sleep((long) (delay * 1000));
                } catch (InterruptedException e) {
                    Thread.currentThread().interrupt();
                    throw new Failure("interrupted");
                }
                continue;
            }
            Object parsed;
            try {
                parsed = Json.parse(resp.body());
            } catch (IllegalArgumentException e) {
                parsed = null;
            }
            if (resp.statusCode() != 200 || !(parsed instanceof Map<?, ?> m)
                    || !m.containsKey("ErrorCode") || num(m.get("ErrorCode")) != 0) {
                throw new Failure("get_list failed: " + describe(resp, parsed));
            }
            @SuppressWarnings("unchecked")
            Map<String, Object> answer = (Map<String, Object>) parsed;
            return answer;
        }
    }

    /** Seconds to wait before retry `attempt` (1-based): Retry-After when present. */
    static double retryDelay(HttpResponse<?> resp, int attempt) {
        double secs;
        try {
            secs = Double.parseDouble(resp.headers().firstValue("retry-after").orElse("").strip());
        } catch (NumberFormatException e) {
            secs = DEFAULT_RETRY_SECS * Math.pow(2, attempt - 1);
        }
        if (!Double.isFinite(secs)) secs = DEFAULT_RETRY_SECS;
        return Math.min(Math.max(secs, 0.1), MAX_RETRY_SECS);
    }

    /** One line naming what went wrong, from the envelope and the gateway's headers. */
    static String describe(HttpResponse<String> resp, Object parsed) {
        List<String> parts = new ArrayList<>();
        parts.add("HTTP " + resp.statusCode());
        if (parsed instanceof Map<?, ?> m && m.containsKey("ErrorCode")) {
            parts.add("ErrorCode " + Json.show(m.get("ErrorCode")) + ": "
                    + Objects.toString(m.get("ErrorInfo"), ""));
        } else {
            String b = resp.body();
            parts.add("body: " + (b.length() > 200 ? b.substring(0, 200) : b));
        }
        resp.headers().firstValue("x-chat-gateway-error").ifPresent(r -> parts.add("gateway: " + r));
        resp.headers().firstValue("x-request-id").ifPresent(r -> parts.add("request id " + r));
        return String.join("; ", parts);
    }

    static String conversationLine(Map<?, ?> item) {
        boolean group = num(item.get("Type")) == 2;
        Object peer = group ? item.get("GroupId") : item.get("To_Account");
        // Instant.toString() is ISO-8601 UTC, without fractions for whole seconds.
        String when = Instant.ofEpochSecond(num(item.get("MsgTime"))).toString();
        String pinned = num(item.get("TopFlag")) == 1 ? "pinned" : "-";
        return (group ? "group" : "c2c") + "\t" + peer + "\t" + when + "\t" + pinned;
    }

    /** A JSON number as a long (0 when absent or not a number). */
    static long num(Object v) {
        return v instanceof Number n ? n.longValue() : 0;
    }

    /** Just enough JSON: objects, arrays, strings, numbers, true/false/null. */
    static final class Json {
        private final String s;
        private int i;

        private Json(String s) {
            this.s = s;
        }

        static Object parse(String text) {
            Json p = new Json(text);
            Object v = p.value();
            p.ws();
            if (p.i != p.s.length()) throw p.error("trailing characters");
            return v;
        }

        static String quote(String v) {
            StringBuilder b = new StringBuilder("\"");
            for (char c : v.toCharArray()) {
                switch (c) {
                    case '"' -> b.append("\\\"");
                    case '\\' -> b.append("\\\\");
                    default -> {
                        if (c < 0x20) b.append(String.format("\\u%04x", (int) c));
                        else b.append(c);
                    }
                }
            }
            return b.append('"').toString();
        }

        static String show(Object v) {
            return v instanceof Double d && d == Math.rint(d) ? Long.toString(d.longValue()) : String.valueOf(v);
        }

        private IllegalArgumentException error(String what) {
            return new IllegalArgumentException(what + " at offset " + i);
        }

        private void ws() {
            while (i < s.length() && " \t\r\n".indexOf(s.charAt(i)) >= 0) i++;
        }

        private Object value() {
            ws();
            if (i >= s.length()) throw error("unexpected end");
            char c = s.charAt(i);
            switch (c) {
                case '{': {
                    i++;
                    Map<String, Object> m = new LinkedHashMap<>();
                    ws();
                    if (i < s.length() && s.charAt(i) == '}') { i++; return m; }
                    while (true) {
                        ws();
                        if (i >= s.length() || s.charAt(i) != '"') throw error("expected a key");
                        String k = string();
                        ws();
                        expect(':');
                        m.put(k, value());
                        ws();
                        if (i < s.length() && s.charAt(i) == ',') { i++; continue; }
                        expect('}');
                        return m;
                    }
                }
                case '[': {
                    i++;
                    List<Object> l = new ArrayList<>();
                    ws();
                    if (i < s.length() && s.charAt(i) == ']') { i++; return l; }
                    while (true) {
                        l.add(value());
                        ws();
                        if (i < s.length() && s.charAt(i) == ',') { i++; continue; }
                        expect(']');
                        return l;
                    }
                }
                case '"':
                    return string();
                case 't': return literal("true", Boolean.TRUE);
                case 'f': return literal("false", Boolean.FALSE);
                case 'n': return literal("null", null);
                default:
                    return number();
            }
        }

        private void expect(char c) {
            if (i >= s.length() || s.charAt(i) != c) throw error("expected '" + c + "'");
            i++;
        }

        private Object literal(String word, Object v) {
            if (!s.startsWith(word, i)) throw error("bad literal");
            i += word.length();
            return v;
        }

        private Object number() {
            int start = i;
            while (i < s.length() && "+-0123456789.eE".indexOf(s.charAt(i)) >= 0) i++;
            String t = s.substring(start, i);
            if (t.isEmpty()) throw error("unexpected character");
            try {
                return t.matches("-?\\d+") ? (Object) Long.parseLong(t) : (Object) Double.parseDouble(t);
            } catch (NumberFormatException e) {
                throw error("bad number");
            }
        }

        private String string() {
            i++; // opening quote
            StringBuilder b = new StringBuilder();
            while (true) {
                if (i >= s.length()) throw error("unterminated string");
                char c = s.charAt(i++);
                if (c == '"') return b.toString();
                if (c != '\\') { b.append(c); continue; }
                if (i >= s.length()) throw error("unterminated escape");
                char e = s.charAt(i++);
                switch (e) {
                    case '"', '\\', '/' -> b.append(e);
                    case 'b' -> b.append('\b');
                    case 'f' -> b.append('\f');
                    case 'n' -> b.append('\n');
                    case 'r' -> b.append('\r');
                    case 't' -> b.append('\t');
                    case 'u' -> {
                        if (i + 4 > s.length()) throw error("bad \\u escape");
                        try {
                            b.append((char) Integer.parseInt(s.substring(i, i + 4), 16));
                        } catch (NumberFormatException x) {
                            throw error("bad \\u escape");
                        }
                        i += 4;
                    }
                    default -> throw error("bad escape");
                }
            }
        }
    }
}
