//! The gateway's own model of a chat request and its answer.
//!
//! The service translates the gRPC messages into these types once, after
//! validation; the registry and the providers only ever see these. Nothing
//! here knows about gRPC, HTTP or JSON wire shapes.

/// Who wrote a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The caller's user.
    User,
    /// The model.
    Assistant,
}

/// One piece of a message.
#[derive(Debug, Clone, PartialEq)]
pub enum Content {
    /// Plain text.
    Text(String),
    /// A tool call made by the model.
    ToolUse {
        /// The provider's id of the call.
        id: String,
        /// The tool's name.
        name: String,
        /// The call's input, a JSON object as text.
        input_json: String,
    },
    /// The result of a tool call.
    ToolResult {
        /// The id of the call this answers.
        tool_use_id: String,
        /// The tool's output.
        content: String,
        /// Whether the tool failed.
        is_error: bool,
    },
}

/// One turn of the conversation.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    /// Who wrote it.
    pub role: Role,
    /// Its content, at least one block.
    pub content: Vec<Content>,
}

/// A tool the model may call.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolSpec {
    /// The tool's name.
    pub name: String,
    /// What it does.
    pub description: String,
    /// Its input schema, already checked to be a JSON object.
    pub input_schema: serde_json::Value,
}

/// How the model may use the tools.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum ToolChoice {
    /// The model decides.
    #[default]
    Auto,
    /// The model must call some tool.
    Any,
    /// The model must call this tool.
    Tool(String),
    /// The model must not call a tool.
    None,
}

/// A validated request, ready for a provider.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ChatRequest {
    /// The model; empty = the provider's default.
    pub model: String,
    /// The system prompt; empty = none.
    pub system: String,
    /// The conversation, oldest first.
    pub messages: Vec<Message>,
    /// The most tokens to generate; `None` = the provider's default.
    pub max_tokens: Option<u32>,
    /// Sampling temperature.
    pub temperature: Option<f32>,
    /// Nucleus sampling.
    pub top_p: Option<f32>,
    /// Strings that end generation.
    pub stop_sequences: Vec<String>,
    /// Tools the model may call.
    pub tools: Vec<ToolSpec>,
    /// How the model may use the tools.
    pub tool_choice: ToolChoice,
}

impl ChatRequest {
    /// The model to ask for: the request's, else `default_model`.
    pub fn model_or<'a>(&'a self, default_model: &'a str) -> &'a str {
        if self.model.is_empty() {
            default_model
        } else {
            &self.model
        }
    }
}

/// Why generation stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// The model finished its turn.
    EndTurn,
    /// `max_tokens` was reached.
    MaxTokens,
    /// A stop sequence was produced.
    StopSequence,
    /// The model asked for tools.
    ToolUse,
    /// The model declined to answer (Anthropic `refusal`).
    Refusal,
    /// The provider's content filter cut or withheld the answer (OpenAI
    /// `content_filter`).
    ContentFilter,
}

/// Token counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    /// Prompt tokens.
    pub input_tokens: u32,
    /// Generated tokens.
    pub output_tokens: u32,
}

/// A whole answer from one attempt.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatResponse {
    /// The provider's id of the answer.
    pub id: String,
    /// The model that answered.
    pub model: String,
    /// Text and tool calls, in order.
    pub content: Vec<Content>,
    /// Why it stopped.
    pub stop_reason: StopReason,
    /// Token counts.
    pub usage: Usage,
}

/// One event of a streamed answer, as a provider yields it.
#[derive(Debug, Clone, PartialEq)]
pub enum StreamEvent {
    /// The answer has begun (carries no content).
    Start {
        /// The provider's id of the answer.
        id: String,
        /// The model that answers.
        model: String,
    },
    /// Text appended to block `index`.
    Text {
        /// The content block.
        index: u32,
        /// The text.
        text: String,
    },
    /// A tool call begins in block `index`.
    ToolUseStart {
        /// The content block.
        index: u32,
        /// The call's id.
        id: String,
        /// The tool's name.
        name: String,
    },
    /// A fragment of the input JSON of the tool call in block `index`.
    ToolInputJson {
        /// The content block.
        index: u32,
        /// The fragment.
        json: String,
    },
    /// Token counts so far.
    Usage(Usage),
    /// Generation ended normally; nothing follows.
    Stop(StopReason),
    /// The stream broke inside text and continues from a continuation
    /// request (the registry emits this; providers never do).
    Resumed {
        /// The attempt serving the continuation.
        attempt: u32,
        /// The provider serving it.
        provider: String,
        /// Characters of text delivered before the break.
        characters_delivered: u64,
    },
    /// The stream broke and was started over (`x-stream-resume: restart`):
    /// everything relayed before is to be discarded; the complete new
    /// answer follows (the registry emits this; providers never do).
    Restarted {
        /// The attempt serving the new answer.
        attempt: u32,
        /// The provider serving it.
        provider: String,
    },
    /// The upstream is alive but has nothing to say yet (an Anthropic
    /// `ping`): it resets the stream's idle timer and is never relayed.
    KeepAlive,
}

impl StreamEvent {
    /// Whether the event carries answer content (the stream's commit point).
    pub fn is_content(&self) -> bool {
        matches!(
            self,
            Self::Text { .. } | Self::ToolUseStart { .. } | Self::ToolInputJson { .. }
        )
    }
}
